"""Pure: the ledger's decisions and the row shapes every backend shares.

The backends differ in SQL and in how they make a read-then-write atomic (the
SQLite writer thread runs one function at a time; PostgreSQL takes advisory
locks). What a guard row means, who may take it, what an outcome makes of it,
and how a row becomes a record are decided here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from ..outcomes import RecipientState
from .records import (
    ANONYMOUS_KEY_PREFIX,
    Guard,
    GuardRequest,
    GuardState,
    MessageRecord,
    RecipientRecord,
)

__all__ = [
    "MESSAGE_COLUMNS",
    "RECIPIENT_COLUMNS",
    "LedgerRow",
    "as_duplicate",
    "check_recipients",
    "claimable",
    "decide",
    "decide_all",
    "GuardRequests",
    "guard_after",
    "live",
    "message_from_row",
    "message_values",
    "opening_rows",
    "recipient_from_row",
    "recipient_values",
    "remembered_state",
    "spooled_copy",
    "ttl_for",
    "untouched",
    "waits_in_spool",
]

#: The columns of ``messages`` and ``recipients`` in the order of the row codecs
#: below (``"user"`` quoted: a reserved word in PostgreSQL, a plain name in SQLite).
MESSAGE_COLUMNS: Final = (
    'queue_id, message_key, mail_from, client, "user", subject, size, received_at, mode, content,'
    " message_id"
)
RECIPIENT_COLUMNS: Final = (
    "queue_id, rcpt, state, route, template_id, api_code, reply, attempts, next_attempt, "
    "updated_at, error, spooled_at"
)


class LedgerRow(NamedTuple):
    """A guard as stored: its state, who holds it, its lease, when it was written."""

    state: GuardState
    holder: str
    until: float | None
    updated_at: float


def ttl_for(message_key: str, dedup_ttl: float, anonymous_ttl: float) -> float:
    """How long the outcome of a message with this key is remembered."""
    return anonymous_ttl if message_key.startswith(ANONYMOUS_KEY_PREFIX) else dedup_ttl


def live(row: LedgerRow, now: float, ttl: float) -> bool:
    """Whether ``row`` still says something: memories last ``ttl``, holds until released."""
    if row.state in (GuardState.DELIVERED, GuardState.UNKNOWN):
        return row.updated_at > now - ttl
    return True  # QUEUED until released; SENDING until taken over (its lease says when)


def _cut(row: LedgerRow, now: float) -> bool:
    """A call whose holder's lease ran out: presumed dead, its call possibly sent."""
    return row.state is GuardState.SENDING and (row.until or 0.0) <= now


def remembered_state(row: LedgerRow, now: float, ttl: float) -> RecipientState | None:
    """What a client retry must know: DELIVERED, UNKNOWN (sent, or possibly sent by a
    holder whose lease ran out), or None (nothing to say)."""
    if not live(row, now, ttl):
        return None
    if row.state is GuardState.DELIVERED:
        return RecipientState.DELIVERED
    if row.state is GuardState.UNKNOWN or _cut(row, now):
        return RecipientState.UNKNOWN
    return None


def decide(row: LedgerRow | None, holder: str, now: float, ttl: float) -> Guard:
    """Whether ``holder`` may take the guard ``row`` (None: no row), and what it held.

    Free: nothing live, an UNKNOWN (the new attempt is a possible duplicate), a
    SENDING whose lease ran out (the same), or a row ``holder`` holds already.
    Taken by another: DELIVERED, QUEUED, or SENDING with a live lease.
    """
    if row is None or not live(row, now, ttl):
        return Guard(True)
    free = row.holder == holder or row.state is GuardState.UNKNOWN or _cut(row, now)
    return Guard(free, row.state, row.holder, row.until)


class GuardRequests:
    """A backend's dedup window per message key, and the guard requests made of
    it: the same for every backend (each says who holds SENDING guards)."""

    _dedup_ttl: float
    _anonymous_ttl: float

    def _guard_owner(self) -> str | None:
        raise NotImplementedError

    def _ttl(self, message_key: str) -> float:
        """How long the outcome of a message with this key is remembered."""
        return ttl_for(message_key, self._dedup_ttl, self._anonymous_ttl)

    def _queued(self, queue_id: str, message_key: str, now: float) -> GuardRequest:
        """A copy's request for the guards of the recipients it spools."""
        return GuardRequest(queue_id, GuardState.QUEUED, now, self._ttl(message_key))

    def _sending(self, queue_id: str, message_key: str, now: float, lease: float) -> GuardRequest:
        """A copy's request for guards to send now, for ``lease`` seconds."""
        ttl, owner = self._ttl(message_key), self._guard_owner()
        return GuardRequest(queue_id, GuardState.SENDING, now, ttl, now + lease, owner)


def decide_all(
    message_key: str, rcpts: Sequence[str], rows: dict[str, LedgerRow], request: GuardRequest
) -> tuple[dict[str, Guard], list[tuple[Any, ...]]]:
    """:func:`decide` for each of ``rcpts`` (lower-cased) given their ``rows``: the
    guards, and the dedup rows to upsert for those taken (message_key, rcpt,
    queue_id, state, updated_at, lease_until, owner)."""
    guards: dict[str, Guard] = {}
    taken: list[tuple[Any, ...]] = []
    r = request
    for rcpt in rcpts:
        guards[rcpt] = guard = decide(rows.get(rcpt), r.holder, r.now, r.ttl)
        if guard.acquired:
            taken.append((message_key, rcpt, r.holder, r.state.value, r.now, r.until, r.owner))
    return guards, taken


def claimable(row: LedgerRow | None, holder: str, now: float) -> tuple[bool, GuardState | None]:
    """A worker's claim of ``holder``'s spooled row: may it take the guard (SENDING),
    and what did the guard say that means the last call may have gone out?

    A guard another copy holds (delivered it meanwhile, or sends it now) is left
    alone: the attempt reads it and skips.
    """
    others = row is not None and row.holder != holder and row.state is not GuardState.UNKNOWN
    if others and row is not None and not _cut(row, now):
        return False, None  # delivered or queued by another copy, or its call is live
    if row is not None and row.state in (GuardState.SENDING, GuardState.UNKNOWN):
        return True, row.state
    return True, None


def guard_after(record: RecipientRecord) -> GuardState | None:
    """The guard once ``record`` is written, or None: release the holder's guard.

    DELIVERED is the truth; a recipient waiting in the spool is QUEUED by its
    message; UNKNOWN not spooled is remembered (the next attempt is a possible
    duplicate); anything given up for now or for good releases it. DUPLICATE
    rows never touch the guard (another copy has it): see :func:`untouched`.
    """
    state = RecipientState(record.state)
    if state is RecipientState.DELIVERED:
        return GuardState.DELIVERED
    if waits_in_spool(record):
        return GuardState.QUEUED
    if state is RecipientState.UNKNOWN:
        return GuardState.UNKNOWN
    return None


def untouched(record: RecipientRecord) -> bool:
    """A row written for a copy that never held the guard: it leaves the guard alone."""
    return RecipientState(record.state) is RecipientState.DUPLICATE


def waits_in_spool(record: RecipientRecord) -> bool:
    """A recipient a worker will attempt: retrying or unknown, with a next attempt."""
    return record.next_attempt is not None and record.state in (
        RecipientState.RETRYING,
        RecipientState.UNKNOWN,
    )


def as_duplicate(record: RecipientRecord, guard: Guard | None) -> RecipientRecord:
    """A spooled recipient whose guard another copy holds: this copy will not send it."""
    if guard is None or guard.acquired or not waits_in_spool(record):
        return record
    state = guard.state.value if guard.state else "held"
    return dataclasses.replace(
        record,
        state=RecipientState.DUPLICATE,
        next_attempt=None,
        spooled_at=None,
        error=f"same message as {guard.holder} ({state})",
    )


def spooled_copy(
    message: MessageRecord, recipients: Sequence[RecipientRecord], guards: dict[str, Guard]
) -> tuple[MessageRecord, list[RecipientRecord]]:
    """What ``add_message`` writes once the guards are taken: recipients another copy
    holds become DUPLICATE, and content no recipient of this copy waits for is dropped."""
    rows = [as_duplicate(r, guards.get(r.rcpt.lower())) for r in recipients]
    copies = any(r.state is RecipientState.DUPLICATE for r in rows)
    if copies and not any(waits_in_spool(r) for r in rows):
        return dataclasses.replace(message, content=None), rows  # another copy sends it
    return message, rows


def check_recipients(message: MessageRecord, recipients: Sequence[RecipientRecord]) -> None:
    """Refuse recipients of another message, and states that do not exist (ValueError)."""
    for record in recipients:
        if record.queue_id != message.queue_id:
            raise ValueError(f"recipient queue_id {record.queue_id!r} is not {message.queue_id!r}")
        RecipientState(record.state)


def opening_rows(message: MessageRecord, rcpts: Sequence[str]) -> list[RecipientRecord]:
    """open_message's recipient rows: RETRYING, nothing sent yet."""
    return [
        RecipientRecord(
            queue_id=message.queue_id,
            rcpt=rcpt,
            state=RecipientState.RETRYING,
            updated_at=message.received_at,
        )
        for rcpt in rcpts
    ]


def message_values(message: MessageRecord) -> tuple[Any, ...]:
    """``message`` as the message columns, in their order (the decoder's inverse)."""
    m = message
    return (m.queue_id, m.message_key, m.mail_from, m.client, m.user, m.subject, m.size,
            m.received_at, m.mode, m.content, m.message_id)  # fmt: skip


def recipient_values(record: RecipientRecord) -> tuple[Any, ...]:
    """``record`` as the recipient columns, in their order (the decoder's inverse)."""
    r = record
    return (r.queue_id, r.rcpt, RecipientState(r.state).value, r.route, r.template_id,
            r.api_code, r.reply, r.attempts, r.next_attempt, r.updated_at, r.error,
            r.spooled_at)  # fmt: skip


def message_from_row(row: Sequence[Any]) -> MessageRecord:
    """A MessageRecord from the message columns (queue_id ... content, message_id)."""
    queue_id, key, mail_from, client, user, subject, size, received_at, mode, content = row[:10]
    return MessageRecord(
        queue_id=queue_id,
        message_key=key,
        mail_from=mail_from,
        client=client,
        user=user,
        subject=subject,
        size=int(size),
        received_at=received_at,
        mode=mode,
        content=None if content is None else bytes(content),
        message_id=row[10] if len(row) > 10 else "",
    )


def recipient_from_row(row: Sequence[Any]) -> RecipientRecord:
    """A RecipientRecord from the recipient columns (queue_id ... spooled_at)."""
    (queue_id, rcpt, state, route, template_id, api_code, reply, attempts, next_attempt) = row[:9]
    updated_at, error, spooled_at = row[9:12]
    return RecipientRecord(
        queue_id=queue_id,
        rcpt=rcpt,
        state=RecipientState(state),
        route=route,
        template_id=template_id,
        api_code=api_code,
        reply=reply,
        attempts=attempts,
        next_attempt=next_attempt,
        updated_at=updated_at,
        error=error,
        spooled_at=spooled_at,
    )
