"""The dedup ledger's SQL for PostgreSQL: who may attempt a (message, recipient).

The same decisions as SQLite's ledger (:mod:`..sqlite.ledger`), made inside the
caller's transaction. SQLite has one writer at a time; here several instances
write at once, so every decision about a (message key, recipient) pair first
takes a transaction-scoped advisory lock on the pair (in sorted order, so two
transactions never wait for each other in a circle) and reads its row FOR
UPDATE: two copies on two hosts never both acquire one guard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from ...outcomes import RecipientState
from ..records import Guard, GuardState, RecipientRecord
from ..rules import LedgerRow, claimable, decide, guard_after, remembered_state, untouched
from .db import execute_rows

__all__ = [
    "acquire",
    "claim",
    "extend",
    "held",
    "lock_all",
    "lock_pairs",
    "record_outcome",
    "release",
    "remembered",
    "requeue",
]

Conn = Any  # psycopg.AsyncConnection

_REMEMBERED: Final = [GuardState.DELIVERED.value, GuardState.UNKNOWN.value]
_HELD: Final = [GuardState.SENDING.value, GuardState.QUEUED.value]

_UPSERT: Final = (
    "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until, owner)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
    " queue_id = excluded.queue_id, state = excluded.state,"
    " updated_at = excluded.updated_at, lease_until = excluded.lease_until,"
    " owner = excluded.owner"
)


async def lock_pairs(conn: Conn, message_key: str, rcpts: Iterable[str]) -> None:
    """Serialise decisions on these (key, lower-cased rcpt) pairs across instances."""
    await lock_all(conn, [(message_key, rcpt) for rcpt in rcpts])


async def lock_all(conn: Conn, pairs: Iterable[tuple[str, str]]) -> None:
    """:func:`lock_pairs` for pairs of several keys, taken in one sorted order."""
    pairs = sorted({(key, rcpt.lower()) for key, rcpt in pairs})
    if not pairs:
        return
    await execute_rows(
        conn, "SELECT pg_advisory_xact_lock(hashtextextended(%s || chr(1) || %s, 0))", pairs
    )


async def held(conn: Conn, message_key: str, rcpts: Sequence[str]) -> dict[str, LedgerRow]:
    """The ledger rows of ``rcpts`` (lower-cased), whatever their age, locked."""
    if not rcpts:
        return {}
    cursor = await conn.execute(
        "SELECT rcpt, state, queue_id, lease_until, updated_at FROM dedup"
        " WHERE message_key = %s AND rcpt = ANY(%s) FOR UPDATE",
        (message_key, list(rcpts)),
    )
    return {
        rcpt: LedgerRow(GuardState(state), holder, until, updated_at)
        for rcpt, state, holder, until, updated_at in await cursor.fetchall()
    }


async def remembered(
    conn: Conn, message_key: str, rcpts: Sequence[str], now: float, ttl: float
) -> dict[str, RecipientState]:
    """For a client retry: rcpt -> DELIVERED, or UNKNOWN (sent, or possibly sent)."""
    if not rcpts:
        return {}
    cursor = await conn.execute(
        "SELECT rcpt, state, queue_id, lease_until, updated_at FROM dedup"
        " WHERE message_key = %s AND rcpt = ANY(%s)",
        (message_key, list(rcpts)),
    )
    found: dict[str, RecipientState] = {}
    for rcpt, state, holder, until, updated_at in await cursor.fetchall():
        remembered = remembered_state(
            LedgerRow(GuardState(state), holder, until, updated_at), now, ttl
        )
        if remembered is not None:
            found[rcpt] = remembered
    return found


async def acquire(
    conn: Conn,
    message_key: str,
    rcpts: Iterable[str],
    *,
    holder: str,
    state: GuardState,
    until: float | None,
    now: float,
    ttl: float,
    owner: str | None = None,
) -> dict[str, Guard]:
    """Take the guard of each free recipient for ``holder`` as ``state`` (as SQLite's)."""
    wanted = sorted({rcpt.lower() for rcpt in rcpts})
    await lock_pairs(conn, message_key, wanted)
    rows = await held(conn, message_key, wanted)
    guards: dict[str, Guard] = {}
    taken: list[str] = []
    for rcpt in wanted:
        guards[rcpt] = guard = decide(rows.get(rcpt), holder, now, ttl)
        if guard.acquired:
            taken.append(rcpt)
    await execute_rows(
        conn,
        _UPSERT,
        [(message_key, rcpt, holder, state.value, now, until, owner) for rcpt in taken],
    )
    return guards


async def claim(
    conn: Conn, message_key: str, rcpt: str, *, holder: str, until: float, now: float
) -> GuardState | None:
    """A worker's claim: the guard becomes SENDING by ``holder`` until ``until``.

    The caller has locked the pair (:func:`lock_pairs`). Returns the state it
    replaced when the last call may have gone out (SENDING), else None; a guard
    another holder has is left alone.
    """
    rcpt = rcpt.lower()
    take, prior = claimable((await held(conn, message_key, [rcpt])).get(rcpt), holder, now)
    if not take:
        return None
    await conn.execute(
        _UPSERT, (message_key, rcpt, holder, GuardState.SENDING.value, now, until, None)
    )
    return prior


async def release(conn: Conn, message_key: str, rcpt: str, holder: str) -> None:
    """Give up ``holder``'s guard (nothing was sent, or it failed for good)."""
    await conn.execute(
        "DELETE FROM dedup WHERE message_key = %s AND rcpt = %s AND queue_id = %s"
        " AND state = ANY(%s)",
        (message_key, rcpt.lower(), holder, _HELD),
    )


async def requeue(conn: Conn, holder: str, rcpt: str) -> None:
    """A claim handed back unattempted: the guard is QUEUED by ``holder`` again."""
    await conn.execute(
        "UPDATE dedup SET state = %s, lease_until = NULL WHERE queue_id = %s AND rcpt = %s"
        " AND state = %s",
        (GuardState.QUEUED.value, holder, rcpt.lower(), GuardState.SENDING.value),
    )


async def extend(conn: Conn, holder: str, rcpt: str, until: float) -> None:
    """A renewed claim: the SENDING guard of ``holder`` lasts until ``until``."""
    await conn.execute(
        "UPDATE dedup SET lease_until = %s WHERE queue_id = %s AND rcpt = %s AND state = %s",
        (until, holder, rcpt.lower(), GuardState.SENDING.value),
    )


async def record_outcome(
    conn: Conn, message_key: str, record: RecipientRecord, *, ttl: float
) -> None:
    """The guard after ``record`` is written (the rules of SQLite's record_outcome)."""
    if untouched(record):
        return
    holder = record.queue_id
    new = guard_after(record)
    if new is None:
        await release(conn, message_key, record.rcpt, holder)
        return
    await lock_pairs(conn, message_key, [record.rcpt])
    await conn.execute(
        "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until)"
        " VALUES (%s, %s, %s, %s, %s, NULL) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
        " queue_id = excluded.queue_id, state = excluded.state,"
        " updated_at = excluded.updated_at, lease_until = NULL"
        # Delivered is the truth; otherwise only the holder (or a stale memory) moves it.
        " WHERE excluded.state = %s"
        " OR (dedup.state <> %s AND (dedup.queue_id = excluded.queue_id OR dedup.state = %s))"
        " OR (dedup.state = ANY(%s) AND dedup.updated_at <= excluded.updated_at - %s)",
        (
            message_key,
            record.rcpt.lower(),
            holder,
            new.value,
            record.updated_at,
            GuardState.DELIVERED.value,
            GuardState.DELIVERED.value,
            GuardState.UNKNOWN.value,
            _REMEMBERED,
            ttl,
        ),
    )
