"""The queue admin's statements (``smtp-bridge queue``, the console), written once.

Each function renders its statements in the backend's :class:`~.dialect.Dialect`
and decodes what comes back; the backend runs them, in order, in one
transaction of its own (:class:`~.base.QueueAdmin` says what each operation
promises).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final, NamedTuple

from ..outcomes import RecipientState
from .dialect import Dialect, Query
from .records import CLAIMABLE_STATES, GuardState, MessageRecord, RecipientRecord
from .rules import MESSAGE_COLUMNS, RECIPIENT_COLUMNS, message_from_row, recipient_from_row
from .spool_sql import waiting

__all__ = [
    "COUNT_STATES",
    "RetryStatements",
    "message_queries",
    "purge_statements",
    "queue_entries",
    "queue_query",
    "recipients_query",
    "retry_statements",
    "state_counts",
]

#: Recipients per state present (rows of state, count).
COUNT_STATES: Final = Query("SELECT state, COUNT(*) FROM recipients GROUP BY state")

#: The message columns by name, and where ``content`` stands among them.
_MESSAGE_NAMES: Final = [c.strip() for c in MESSAGE_COLUMNS.split(",")]
_CONTENT_AT: Final = _MESSAGE_NAMES.index("content")
#: ``list_queue``'s columns: the content itself stays in the database, only
#: whether there is any comes back.
_QUEUE_COLUMNS: Final = ", ".join(
    [f"m.{c}" if c != "content" else "m.content IS NOT NULL" for c in _MESSAGE_NAMES]
    + [f"r.{c.strip()}" for c in RECIPIENT_COLUMNS.split(",")]
)
#: ``messages AS m`` of a dead letter's recipient ``r`` still has its content.
_SPOOLED: Final = (
    " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
    " AND m.content IS NOT NULL)"
)


def message_queries(dialect: Dialect, queue_id: str) -> tuple[Query, Query]:
    """``get_message``: the message row, then its recipients by address."""
    p = dialect.mark
    return (
        Query(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = {p}", (queue_id,)),
        Query(
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE queue_id = {p} ORDER BY rcpt",
            (queue_id,),
        ),
    )


def recipients_query(
    dialect: Dialect, states: Collection[RecipientState] | None, limit: int
) -> Query | None:
    """``list_recipients``: most recently updated first; None when nothing can match."""
    if limit <= 0 or (states is not None and not states):
        return None
    where, params = "", ()
    if states is not None:
        condition, params = dialect.one_of(
            "state", sorted({RecipientState(state).value for state in states})
        )
        where = f" WHERE {condition}"
    return Query(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipients{where}"
        f" ORDER BY updated_at DESC, queue_id DESC, rcpt LIMIT {dialect.mark}",
        (*params, limit),
    )


def queue_query(dialect: Dialect, *, dead: bool, limit: int) -> Query:
    """``list_queue``: the message columns (whether there is content, in its place),
    then the recipient columns, oldest first."""
    if dead:
        where, params = f"r.state = {dialect.mark}", (RecipientState.DEAD.value,)
    else:
        where, params = waiting(dialect)
    return Query(
        f"SELECT {_QUEUE_COLUMNS}"
        " FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id"
        f" WHERE {where} ORDER BY m.received_at, r.queue_id, r.rcpt LIMIT {dialect.mark}",
        (*params, limit),
    )


def queue_entries(rows: Iterable[Sequence[Any]]) -> list[tuple[MessageRecord, RecipientRecord]]:
    """The rows of :func:`queue_query` as records; ``content`` is ``b""`` when the
    message has some, else None."""
    at, width = _CONTENT_AT, len(_MESSAGE_NAMES)
    found = []
    for row in rows:
        head = (*row[:at], b"" if row[at] else None, *row[at + 1 : width])
        found.append((message_from_row(head), recipient_from_row(row[width:])))
    return found


class RetryStatements(NamedTuple):
    """``queue retry``, in the order they run (one transaction)."""

    #: The dead letters that can be resent: rows of (message_key, rcpt, queue_id),
    #: whose guards go back to QUEUED before :attr:`revive`.
    resendable: Query
    #: Those dead letters back in the spool, due now (its rowcount: how many).
    revive: Query
    #: The waiting recipients of the one message retried made due now (None when
    #: every dead letter is retried: no message is hurried).
    hurry: Query | None
    #: One row: how many dead letters are left (no content: cannot be resent).
    stuck: Query


def retry_statements(dialect: Dialect, queue_id: str | None, now: float) -> RetryStatements:
    """``queue retry`` of ``queue_id`` (None: every dead letter) at ``now``."""
    p = dialect.mark
    scope = "" if queue_id is None else f" AND r.queue_id = {p}"
    scope_params: tuple[Any, ...] = () if queue_id is None else (queue_id,)
    dead = RecipientState.DEAD.value
    hurry = None
    if queue_id is not None:
        claimable, states = dialect.one_of("r.state", CLAIMABLE_STATES)
        hurry = Query(
            f"UPDATE recipients AS r SET next_attempt = {p}"
            f" WHERE {claimable} AND r.next_attempt > {p}{scope}{_SPOOLED}",
            (now, *states, now, *scope_params),
        )
    return RetryStatements(
        resendable=Query(
            "SELECT m.message_key, r.rcpt, r.queue_id FROM recipients AS r JOIN messages AS m"
            f" ON m.queue_id = r.queue_id WHERE r.state = {p}{scope}{_SPOOLED}",
            (dead, *scope_params),
        ),
        revive=Query(
            f"UPDATE recipients AS r SET state = {p}, next_attempt = {p}, spooled_at = {p},"
            f" claimed_until = NULL, claimed_by = NULL, error = '', updated_at = {p}"
            f" WHERE r.state = {p}{scope}{_SPOOLED}",
            (RecipientState.RETRYING.value, now, now, now, dead, *scope_params),
        ),
        hurry=hurry,
        stuck=Query(
            f"SELECT COUNT(*) FROM recipients AS r WHERE r.state = {p}{scope}",
            (dead, *scope_params),
        ),
    )


def purge_statements(dialect: Dialect, queue_id: str | None, *, dead: bool) -> list[Query]:
    """``queue purge`` of message ``queue_id``, or (``dead``) of every dead letter.

    The first statement's rowcount is the recipient rows deleted; messages left
    without recipients go with them, and the dedup memory is kept (a purged
    message's own QUEUED and SENDING guards are released). ValueError unless
    exactly one of the two is given.
    """
    if (queue_id is None) == (not dead):
        raise ValueError("give a queue id or dead=True")
    p = dialect.mark
    if queue_id is not None:
        held, states = dialect.one_of("state", (GuardState.QUEUED.value, GuardState.SENDING.value))
        return [
            Query(f"DELETE FROM recipients WHERE queue_id = {p}", (queue_id,)),
            Query(f"DELETE FROM dedup WHERE queue_id = {p} AND {held}", (queue_id, *states)),
            Query(f"DELETE FROM messages WHERE queue_id = {p}", (queue_id,)),
        ]
    return [
        Query(f"DELETE FROM recipients WHERE state = {p}", (RecipientState.DEAD.value,)),
        Query(
            "DELETE FROM messages WHERE NOT EXISTS"
            " (SELECT 1 FROM recipients AS r WHERE r.queue_id = messages.queue_id)"
        ),
    ]


def state_counts(rows: Iterable[Sequence[Any]]) -> dict[str, int]:
    """The rows of :data:`COUNT_STATES` with every state present (zero when none)."""
    result = {state.value: 0 for state in RecipientState}
    for state, count in rows:
        result[state] = int(count)
    return result
