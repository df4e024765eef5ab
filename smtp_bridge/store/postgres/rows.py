"""Rows of the PostgreSQL store: the shared writes (message, recipients, dedup) and decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ..records import MessageRecord, RecipientRecord
from ..rules import (
    message_from_row,
    message_values,
    recipient_from_row,
    recipient_values,
)
from . import ledger
from .db import execute_rows
from .schema import MESSAGE_COLUMNS, RECIPIENT_COLUMNS

__all__ = [
    "NOTIFY",
    "insert_message",
    "message_row",
    "put_recipients",
    "recipient_row",
]

#: The shared decoders (store/rules.py), under the names this backend uses.
message_row = message_from_row
recipient_row = recipient_from_row

Conn = Any  # psycopg.AsyncConnection; kept loose here so the SQL helpers stay small

#: Sent in the transaction of every write that puts content in the spool.
NOTIFY: Final = "SELECT pg_notify('smtp_bridge_spool', '')"

_PUT_RECIPIENT: Final = (
    f"INSERT INTO recipients ({RECIPIENT_COLUMNS}, claimed_until)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, NULL)"
    " ON CONFLICT (queue_id, rcpt) DO UPDATE SET"
    " state = excluded.state, route = excluded.route,"
    " template_id = excluded.template_id, api_code = excluded.api_code,"
    " reply = excluded.reply, attempts = GREATEST(recipients.attempts, excluded.attempts),"
    " next_attempt = excluded.next_attempt, updated_at = excluded.updated_at,"
    " error = excluded.error, claimed_until = NULL, claimed_by = NULL,"
    " spooled_at = COALESCE(excluded.spooled_at, recipients.spooled_at)"
)


async def insert_message(
    conn: Conn,
    message: MessageRecord,
    recipients: Sequence[RecipientRecord],
    ttl: float,
    *,
    guards: bool = True,
) -> None:
    """The message row and its (already stamped) recipients; a known queue_id fails."""
    await conn.execute(
        f"INSERT INTO messages ({MESSAGE_COLUMNS})"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        message_values(message),
    )
    await put_recipients(conn, recipients, message.message_key, ttl, guards=guards)


async def put_recipients(
    conn: Conn,
    records: Sequence[RecipientRecord],
    message_key: str,
    ttl: float,
    *,
    guards: bool = True,
) -> None:
    """Upsert ``records`` (in order, one pipeline), then move their guards on
    (``guards`` False: the caller takes them itself, as open_message does)."""
    if not records:
        return
    await execute_rows(conn, _PUT_RECIPIENT, [recipient_values(r) for r in records])
    if not guards:
        return
    for record in records:
        await ledger.record_outcome(conn, message_key, record, ttl=ttl)
