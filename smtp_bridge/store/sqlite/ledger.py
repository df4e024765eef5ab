"""The dedup ledger's SQL for SQLite: who may attempt a (message, recipient), what became of it.

Every function runs on the writer's connection inside the caller's transaction;
the rules they keep are written once in :mod:`smtp_bridge.store.base`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Final

from ...outcomes import RecipientState
from ..records import Guard, GuardRequest, GuardState, RecipientRecord
from ..rules import (
    LedgerRow,
    claimable,
    decide_all,
    guard_after,
    remembered_state,
    untouched,
)

__all__ = [
    "acquire",
    "claim",
    "extend",
    "held",
    "record_outcome",
    "release",
    "remembered",
    "requeue",
]

#: Keeps ``IN (...)`` lists below SQLite's bound-parameter limit.
_IN_CHUNK: Final = 500
_REMEMBERED: Final = (GuardState.DELIVERED.value, GuardState.UNKNOWN.value)


def held(conn: sqlite3.Connection, message_key: str, rcpts: Sequence[str]) -> dict[str, LedgerRow]:
    """The ledger rows of ``rcpts`` (lower-cased), whatever their age."""
    found: dict[str, LedgerRow] = {}
    for start in range(0, len(rcpts), _IN_CHUNK):
        chunk = rcpts[start : start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT rcpt, state, queue_id, lease_until, updated_at FROM dedup"
            f" WHERE message_key = ? AND rcpt IN ({marks})",
            (message_key, *chunk),
        )
        for rcpt, state, holder, until, updated_at in rows:
            found[rcpt] = LedgerRow(GuardState(state), holder, until, updated_at)
    return found


def remembered(
    conn: sqlite3.Connection, message_key: str, rcpts: Sequence[str], now: float, ttl: float
) -> dict[str, RecipientState]:
    """For a client retry: rcpt -> DELIVERED, or UNKNOWN (sent, or possibly sent by a
    holder whose lease ran out); recipients with nothing to say are absent."""
    found: dict[str, RecipientState] = {}
    for rcpt, row in held(conn, message_key, rcpts).items():
        state = remembered_state(row, now, ttl)
        if state is not None:
            found[rcpt] = state
    return found


def acquire(
    conn: sqlite3.Connection, message_key: str, rcpts: Iterable[str], request: GuardRequest
) -> dict[str, Guard]:
    """Take the guard of each free recipient for ``request`` (the rules: rules.decide)."""
    wanted = sorted({rcpt.lower() for rcpt in rcpts})
    guards, taken = decide_all(message_key, wanted, held(conn, message_key, wanted), request)
    conn.executemany(
        "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until, owner)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
        " queue_id = excluded.queue_id, state = excluded.state,"
        " updated_at = excluded.updated_at, lease_until = excluded.lease_until,"
        " owner = excluded.owner",
        taken,
    )
    return guards


def claim(
    conn: sqlite3.Connection, message_key: str, rcpt: str, *, holder: str, until: float, now: float
) -> GuardState | None:
    """A worker's claim: the guard becomes SENDING by ``holder`` until ``until``.

    Returns the state it replaced when that says the last call may have gone out
    (SENDING: an attempt that never recorded its end), else None. A guard that
    another holder has (a copy delivered it meanwhile) is left alone: the attempt
    reads it and skips.
    """
    rcpt = rcpt.lower()
    take, prior = claimable(held(conn, message_key, [rcpt]).get(rcpt), holder, now)
    if not take:
        return None
    conn.execute(
        "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
        " queue_id = excluded.queue_id, state = excluded.state,"
        " updated_at = excluded.updated_at, lease_until = excluded.lease_until",
        (message_key, rcpt, holder, GuardState.SENDING.value, now, until),
    )
    return prior


def release(conn: sqlite3.Connection, message_key: str, rcpt: str, holder: str) -> None:
    """Give up ``holder``'s guard (nothing was sent, or it failed for good)."""
    conn.execute(
        "DELETE FROM dedup WHERE message_key = ? AND rcpt = ? AND queue_id = ? AND state IN (?, ?)",
        (message_key, rcpt.lower(), holder, GuardState.SENDING.value, GuardState.QUEUED.value),
    )


def requeue(conn: sqlite3.Connection, holder: str, rcpt: str) -> None:
    """A claim handed back unattempted: the guard is QUEUED by ``holder`` again."""
    conn.execute(
        "UPDATE dedup SET state = ?, lease_until = NULL WHERE queue_id = ? AND rcpt = ?"
        " AND state = ?",
        (GuardState.QUEUED.value, holder, rcpt.lower(), GuardState.SENDING.value),
    )


def extend(conn: sqlite3.Connection, holder: str, rcpt: str, until: float) -> None:
    """A renewed claim: the SENDING guard of ``holder`` lasts until ``until``."""
    conn.execute(
        "UPDATE dedup SET lease_until = ? WHERE queue_id = ? AND rcpt = ? AND state = ?",
        (until, holder, rcpt.lower(), GuardState.SENDING.value),
    )


def record_outcome(
    conn: sqlite3.Connection, message_key: str, record: RecipientRecord, *, ttl: float
) -> None:
    """The guard after ``record`` is written: what its state means for other copies.

    DELIVERED is the truth and always kept (never downgraded within ``ttl``);
    UNKNOWN not spooled is remembered (the next attempt is a possible duplicate);
    a recipient waiting in the spool is QUEUED by its message; anything given up
    for now or for good releases the holder's guard.
    """
    if untouched(record):
        return
    holder = record.queue_id
    new = guard_after(record)
    if new is None:
        release(conn, message_key, record.rcpt, holder)
        return
    conn.execute(
        "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until)"
        " VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
        " queue_id = excluded.queue_id, state = excluded.state,"
        " updated_at = excluded.updated_at, lease_until = NULL"
        # Delivered is the truth; otherwise only the holder (or a stale memory) moves it.
        " WHERE excluded.state = ?"
        " OR (dedup.state != ? AND (dedup.queue_id = excluded.queue_id OR dedup.state = ?))"
        " OR (dedup.state IN (?, ?) AND dedup.updated_at <= excluded.updated_at - ?)",
        (
            message_key,
            record.rcpt.lower(),
            holder,
            new.value,
            record.updated_at,
            GuardState.DELIVERED.value,
            GuardState.DELIVERED.value,
            GuardState.UNKNOWN.value,
            *_REMEMBERED,
            ttl,
        ),
    )
