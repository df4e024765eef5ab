"""The spool's statements both backends run alike, and the error texts they write.

Also the lookup of a reused Message-ID (:func:`reused_message_id`), which every
new message runs against the messages the spool keeps.

What "waits in the spool" means, and how what a dead session left behind is
settled (:meth:`~.base.Spool.resolve_stale`; SQLite's ``recover_claims``), are
written here once in each backend's :class:`~.dialect.Dialect`. The claim
stays in each backend: it is the hot path, and where the engines differ most.
"""

from __future__ import annotations

from typing import Any, Final

from ..outcomes import RecipientState
from .dialect import Dialect, Query
from .records import CLAIMABLE_STATES, CONTENT_DONE_STATES, GuardState

__all__ = [
    "ABANDONED",
    "CUT",
    "INTERRUPTED",
    "abandoned",
    "claimer",
    "cut_sessions",
    "drop_done_content",
    "reused_message_id",
    "settle_cut",
    "spool_stats_query",
    "waiting",
]

#: A session's call cut by a crash, settled by resolve_stale.
CUT: Final = "interrupted: the session ended during the call; it may have been sent"
#: A session that ended before it sent anything or answered its client.
ABANDONED: Final = "interrupted: the session ended before its reply; this copy sent nothing"
#: The error text of a recipient whose last attempt never recorded its end.
INTERRUPTED: Final = "interrupted: the attempt stopped before its answer was recorded"


def waiting(dialect: Dialect) -> tuple[str, tuple[Any, ...]]:
    """The condition (on ``recipients AS r JOIN messages AS m``) of a recipient a
    worker will attempt: claimable, with a next attempt and spooled content."""
    claimable, params = dialect.one_of("r.state", CLAIMABLE_STATES)
    return f"{claimable} AND r.next_attempt IS NOT NULL AND m.content IS NOT NULL", params


def spool_stats_query(dialect: Dialect) -> Query:
    """One row: how many recipients wait, and the oldest one's ``spooled_at``."""
    where, params = waiting(dialect)
    return Query(
        "SELECT COUNT(*), MIN(COALESCE(r.spooled_at, m.received_at))"
        f" FROM recipients AS r JOIN messages AS m ON m.queue_id = r.queue_id WHERE {where}",
        params,
    )


def cut_sessions(dialect: Dialect, now: float, *, suffix: str = "") -> Query:
    """Sessions' SENDING guards whose lease ran out (message_key, rcpt, queue_id).

    A session's message has no spooled content (a worker's claim has its own
    lease). ``suffix``: the backend's ordering and row locks, if it takes any.
    """
    p = dialect.mark
    return Query(
        "SELECT d.message_key, d.rcpt, d.queue_id FROM dedup AS d"
        f" WHERE d.state = {p} AND d.lease_until < {p} AND EXISTS (SELECT 1 FROM messages"
        f" AS m WHERE m.queue_id = d.queue_id AND m.content IS NULL){suffix}",
        (GuardState.SENDING.value, now),
    )


def settle_cut(
    dialect: Dialect, key: str, rcpt: str, holder: str, now: float
) -> tuple[Query, Query]:
    """A session's call cut short (the call may have been sent): UNKNOWN, guard and row."""
    p = dialect.mark
    return (
        Query(
            f"UPDATE dedup SET state = {p}, lease_until = NULL, owner = NULL, updated_at = {p}"
            f" WHERE message_key = {p} AND rcpt = {p}",
            (GuardState.UNKNOWN.value, now, key, rcpt),
        ),
        Query(
            f"UPDATE recipients SET state = {p}, error = {p}, next_attempt = NULL,"
            f" updated_at = {p} WHERE queue_id = {p} AND lower(rcpt) = {p} AND state = {p}",
            (RecipientState.UNKNOWN.value, CUT, now, holder, rcpt, RecipientState.RETRYING.value),
        ),
    )


def abandoned(dialect: Dialect, now: float, older_than: float) -> Query:
    """Session copies that never got to send (they waited for another copy, or were
    cut before the call), RETRYING for ``older_than`` seconds: FAILED."""
    p = dialect.mark
    return Query(
        f"UPDATE recipients AS r SET state = {p}, error = {p}, updated_at = {p}"
        f" WHERE r.state = {p} AND r.next_attempt IS NULL AND r.updated_at < {p}"
        " AND EXISTS (SELECT 1 FROM messages AS m WHERE m.queue_id = r.queue_id"
        " AND m.content IS NULL)",
        (
            RecipientState.FAILED.value,
            ABANDONED,
            now,
            RecipientState.RETRYING.value,
            now - older_than,
        ),
    )


def claimer(dialect: Dialect, queue_id: str, rcpt: str, *, suffix: str = "") -> Query:
    """Who holds the claim of a recipient row (``suffix``: PostgreSQL's ``FOR UPDATE``)."""
    m = dialect.mark
    return Query(
        f"SELECT claimed_by FROM recipients WHERE queue_id = {m} AND rcpt = {m}{suffix}",
        (queue_id, rcpt),
    )


def drop_done_content(dialect: Dialect, queue_id: str) -> Query:
    """Forget a message's content once no recipient of it can need it (CONTENT_DONE_STATES)."""
    m = dialect.mark
    done, params = dialect.one_of("state", CONTENT_DONE_STATES)
    return Query(
        f"UPDATE messages SET content = NULL WHERE queue_id = {m} AND content IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM recipients WHERE queue_id = messages.queue_id"
        f" AND NOT ({done}))",
        (queue_id, *params),
    )


def reused_message_id(dialect: Dialect) -> str:
    """An earlier message with this Message-ID and other content, within the dedup
    window; parameters: message_id, message_key, the window's start.

    ``message_id <> ''`` is the partial index's own condition, spelled out: without
    it SQLite cannot use that index for a bound ``message_id = ?`` (nor PostgreSQL
    in a generic plan) and walked every message of the window by ``received_at``,
    one row read per message (3 ms a message with 1,100 in the window;
    bench/README.md, change 17).
    """
    m = dialect.mark
    return (
        f"SELECT queue_id FROM messages WHERE message_id = {m} AND message_id <> ''"
        f" AND message_key <> {m} AND received_at > {m} ORDER BY received_at DESC LIMIT 1"
    )
