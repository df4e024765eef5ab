"""Rows of the PostgreSQL store: the shared writes (message, recipients, dedup) and decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ...outcomes import RecipientState
from ..records import MessageRecord, RecipientRecord
from ..rules import message_from_row, recipient_from_row
from . import ledger
from .db import execute_rows
from .schema import MESSAGE_COLUMNS, RECIPIENT_COLUMNS

__all__ = [
    "NOTIFY",
    "check_recipients",
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


def check_recipients(message: MessageRecord, recipients: Sequence[RecipientRecord]) -> None:
    """Refuse recipients of another message, and states that do not exist (ValueError)."""
    for record in recipients:
        if record.queue_id != message.queue_id:
            raise ValueError(f"recipient queue_id {record.queue_id!r} is not {message.queue_id!r}")
        RecipientState(record.state)


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
        (
            message.queue_id,
            message.message_key,
            message.mail_from,
            message.client,
            message.user,
            message.subject,
            message.size,
            message.received_at,
            message.mode,
            message.content,
            message.message_id,
        ),
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
    rows = [
        (
            record.queue_id,
            record.rcpt,
            RecipientState(record.state).value,
            record.route,
            record.template_id,
            record.api_code,
            record.reply,
            record.attempts,
            record.next_attempt,
            record.updated_at,
            record.error,
            record.spooled_at,
        )
        for record in records
    ]
    await execute_rows(conn, _PUT_RECIPIENT, rows)
    if not guards:
        return
    for record in records:
        await ledger.record_outcome(conn, message_key, record, ttl=ttl)
