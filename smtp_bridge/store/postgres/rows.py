"""Rows of the PostgreSQL store: the shared writes (message, recipients, dedup) and decoding."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

from ..records import MessageRecord, RecipientRecord
from ..rules import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    message_from_row,
    message_values,
    recipient_from_row,
    recipient_values,
)
from . import ledger

__all__ = [
    "MESSAGE_INSERT",
    "NOTIFY",
    "ROWS_PER_STATEMENT",
    "insert_message",
    "insert_rows",
    "one_statement",
    "message_row",
    "put_recipients",
    "recipient_row",
    "recipients_insert",
    "recipients_params",
]

#: The shared decoders (store/rules.py), under the names this backend uses.
message_row = message_from_row
recipient_row = recipient_from_row

Conn = Any  # psycopg.AsyncConnection; kept loose here so the SQL helpers stay small

#: Sent in the transaction of every write that puts content in the spool.
NOTIFY: Final = "SELECT pg_notify('smtp_bridge_spool', '')"

#: Rows in one multi-row statement at most (PostgreSQL takes 65,535 parameters).
ROWS_PER_STATEMENT: Final = 500

_ON_CONFLICT_RECIPIENT: Final = (
    " ON CONFLICT (queue_id, rcpt) DO UPDATE SET"
    " state = excluded.state, route = excluded.route,"
    " template_id = excluded.template_id, api_code = excluded.api_code,"
    " reply = excluded.reply, attempts = GREATEST(recipients.attempts, excluded.attempts),"
    " next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,"
    " error = excluded.error, claimed_until = NULL, claimed_by = NULL,"
    " spooled_at = COALESCE(excluded.spooled_at, recipients.spooled_at)"
)
_MESSAGE_ROW: Final = "(" + ", ".join(["%s"] * len(MESSAGE_COLUMNS.split(","))) + ")"
_RECIPIENT_ROW: Final = "(" + ", ".join(["%s"] * len(RECIPIENT_COLUMNS.split(","))) + ", NULL)"


@functools.lru_cache(maxsize=64)
def recipients_insert(count: int, *, upsert: bool) -> str:
    """INSERT of ``count`` recipient rows; ``upsert``: an existing row is updated."""
    rows = ", ".join([_RECIPIENT_ROW] * count)
    conflict = _ON_CONFLICT_RECIPIENT if upsert else ""
    return f"INSERT INTO recipients ({RECIPIENT_COLUMNS}, claimed_until) VALUES {rows}{conflict}"


def recipients_params(records: Sequence[RecipientRecord]) -> list[Any]:
    """The parameters of :func:`recipients_insert` for ``records``."""
    return [value for record in records for value in recipient_values(record)]


MESSAGE_INSERT: Final = f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES {_MESSAGE_ROW}"


async def insert_message(
    conn: Conn,
    message: MessageRecord,
    recipients: Sequence[RecipientRecord],
    ttl: float,
) -> None:
    """The message row and its (already stamped) recipients; a known queue_id fails."""
    await conn.execute(MESSAGE_INSERT, message_values(message))
    await put_recipients(conn, recipients, message.message_key, ttl)


def one_statement(records: Sequence[RecipientRecord]) -> bool:
    """Whether :func:`put_recipients` writes ``records`` in one statement.

    Not when there are more than :data:`ROWS_PER_STATEMENT`, nor when they name one
    recipient twice (an upsert cannot touch a row twice in one statement).
    """
    return len(records) <= ROWS_PER_STATEMENT and len({r.rcpt.lower() for r in records}) == len(
        records
    )


async def insert_rows(conn: Conn, records: Sequence[RecipientRecord]) -> None:
    """New recipient rows only (no guard moves), :data:`ROWS_PER_STATEMENT` a statement."""
    for start in range(0, len(records), ROWS_PER_STATEMENT):
        chunk = records[start : start + ROWS_PER_STATEMENT]
        await conn.execute(recipients_insert(len(chunk), upsert=False), recipients_params(chunk))


async def put_recipients(
    conn: Conn, records: Sequence[RecipientRecord], message_key: str, ttl: float
) -> None:
    """Upsert ``records`` and move their guards on, in order: one statement when
    :func:`one_statement` says so, else one a recipient."""
    if not records:
        return
    if not one_statement(records):
        for record in records:
            await put_recipients(conn, [record], message_key, ttl)
        return
    moves = ledger.guard_moves(message_key, records, ttl=ttl)
    sql = recipients_insert(len(records), upsert=True)
    params = recipients_params(records)
    if moves is not None:
        ctes, guard_params = moves
        sql = f"WITH {ctes} {sql}"
        params = guard_params + params
    await conn.execute(sql, params)
