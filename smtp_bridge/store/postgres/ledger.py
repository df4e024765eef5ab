"""The dedup ledger's SQL for PostgreSQL: who may attempt a (message, recipient).

The same decisions as SQLite's ledger (:mod:`..sqlite.ledger`), made inside the
caller's transaction. SQLite has one writer at a time; here several instances
write at once, so every decision about a (message key, recipient) pair first
takes a transaction-scoped advisory lock on the pair (in sorted order, so two
transactions never wait for each other in a circle) and reads its row FOR
UPDATE: two copies on two hosts never both acquire one guard. A guard that has
no row at all is taken in the statement that locks it (:func:`take_free`, ON
CONFLICT DO NOTHING): the common case, a new message, costs one statement.
Statements carry their rows as scalar ``VALUES`` (:func:`values`), never arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, Final

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
from .db import execute_rows

__all__ = [
    "CHUNK",
    "acquire",
    "claim",
    "extend",
    "guard_moves",
    "held",
    "lock_all",
    "locks",
    "pair_params",
    "remembered",
    "requeue",
    "take_free",
    "values",
]

Conn = Any  # psycopg.AsyncConnection

#: Recipients whose guards one statement takes, at most (PostgreSQL takes 65,535 parameters).
CHUNK: Final = 500
#: Guard states as SQL literals (enum values, never user data).
_DELIVERED: Final = GuardState.DELIVERED.value
_REMEMBERED_SQL: Final = f"('{GuardState.DELIVERED.value}', '{GuardState.UNKNOWN.value}')"
_HELD_SQL: Final = f"('{GuardState.SENDING.value}', '{GuardState.QUEUED.value}')"

_UPSERT: Final = (
    "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until, owner)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (message_key, rcpt) DO UPDATE SET"
    " queue_id = excluded.queue_id, state = excluded.state,"
    " updated_at = excluded.updated_at, lease_until = excluded.lease_until,"
    " owner = excluded.owner"
)


@functools.lru_cache(maxsize=128)
def values(count: int, row: str) -> str:
    """``(VALUES row, row, ...)``: ``count`` rows of scalar parameters, in order.

    Scalars, not arrays: psycopg dumps a list element by element in Python, which
    measured as the largest cost of a statement; a row template may cast (``%s::float8``)
    where a NULL must have a type.
    """
    return "(VALUES " + ", ".join([row] * count) + ")"


def locks(count: int) -> str:
    """Takes the advisory lock of ``count`` (key, rcpt) pairs, in the order given
    (the caller sorts them, :func:`pair_params`: one order everywhere, no lock cycles)."""
    return (
        "SELECT count(pg_advisory_xact_lock(hashtextextended(k || chr(1) || r, 0))) AS locked"
        f" FROM {values(count, '(%s, %s)')} AS pair(k, r)"
    )


def pair_params(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """:func:`locks`'s parameters: the (key, lower-cased rcpt) pairs, sorted, unique, flat."""
    return [part for pair in sorted({(key, rcpt.lower()) for key, rcpt in pairs}) for part in pair]


async def lock_all(conn: Conn, pairs: Iterable[tuple[str, str]]) -> None:
    """Serialise decisions on these (key, lower-cased rcpt) pairs across instances,
    in one statement."""
    params = pair_params(pairs)
    if params:
        await conn.execute(locks(len(params) // 2), params)


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


def take_free(
    message_key: str, wanted: Sequence[str], request: GuardRequest
) -> tuple[str, list[Any]]:
    """Two CTEs, ``locks`` and ``taken``: lock the pairs of ``wanted`` (lower-cased,
    sorted), then take each guard that has no row at all; ``taken`` returns the
    rcpts it took.

    The common case, a new message, is decided in this one statement. It is safe
    beside the lock-read-decide path because the lock comes first, and ON CONFLICT
    sees rows committed after the statement's snapshot: a row another holder wrote
    is a conflict, left to :func:`acquire`'s lock-read-decide (on a fresh snapshot).
    """
    sql = (
        f"locks AS ({locks(len(wanted))}), taken AS ("
        "INSERT INTO dedup (message_key, rcpt, queue_id, state, updated_at, lease_until, owner)"
        " SELECT %s, t.rcpt, %s, %s, %s::float8, %s::float8, %s"
        f" FROM {values(len(wanted), '(%s)')} AS t(rcpt) CROSS JOIN locks"
        " ON CONFLICT (message_key, rcpt) DO NOTHING RETURNING rcpt)"
    )
    r = request
    params: list[Any] = pair_params((message_key, rcpt) for rcpt in wanted)
    params += [message_key, r.holder, r.state.value, r.now, r.until, r.owner, *wanted]
    return sql, params


async def acquire(
    conn: Conn, message_key: str, rcpts: Iterable[str], request: GuardRequest
) -> dict[str, Guard]:
    """Take the guard of each free recipient for ``request`` (the rules: rules.decide).

    :data:`CHUNK` recipients a statement, in one sorted order (no lock cycles).
    """
    wanted = sorted({rcpt.lower() for rcpt in rcpts})
    guards: dict[str, Guard] = {}
    for start in range(0, len(wanted), CHUNK):
        chunk = wanted[start : start + CHUNK]
        ctes, params = take_free(message_key, chunk, request)
        cursor = await conn.execute(f"WITH {ctes} SELECT rcpt FROM taken", params)
        taken = {row[0] for row in await cursor.fetchall()}
        guards |= await _decide_rest(conn, message_key, chunk, taken, request)
    return guards


async def _decide_rest(
    conn: Conn, message_key: str, wanted: Sequence[str], taken: set[str], request: GuardRequest
) -> dict[str, Guard]:
    """After :func:`take_free`: decide the guards it found a row for (locked already)."""
    rest = [rcpt for rcpt in wanted if rcpt not in taken]
    guards, moved = decide_all(message_key, rest, await held(conn, message_key, rest), request)
    await execute_rows(conn, _UPSERT, moved)
    guards |= {rcpt: Guard(True) for rcpt in taken}
    return {rcpt: guards[rcpt] for rcpt in wanted}


async def claim(
    conn: Conn, message_key: str, rcpt: str, *, holder: str, until: float, now: float
) -> GuardState | None:
    """A worker's claim: the guard becomes SENDING by ``holder`` until ``until``.

    The caller has locked the pair (:func:`lock_all`). Returns the state it
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


#: The guard of one written record moves on (the rules of SQLite's record_outcome):
#: delivered is the truth; otherwise only the holder (or a stale memory) moves it.
_MOVE_GUARD: Final = (
    " ON CONFLICT (message_key, rcpt) DO UPDATE SET"
    " queue_id = excluded.queue_id, state = excluded.state,"
    " updated_at = excluded.updated_at, lease_until = NULL"
    f" WHERE excluded.state = '{_DELIVERED}' OR (dedup.state <> '{_DELIVERED}'"
    f" AND (dedup.queue_id = excluded.queue_id OR dedup.state = '{GuardState.UNKNOWN.value}'))"
    f" OR (dedup.state IN {_REMEMBERED_SQL} AND dedup.updated_at <= excluded.updated_at - %s)"
)


def guard_moves(
    message_key: str, records: Sequence[RecipientRecord], *, ttl: float
) -> tuple[str, list[Any]] | None:
    """CTEs (``guard_locks``, ``released``, ``moved``) that move the guards of
    ``records`` once they are written, or None when none has one to move.

    One pair (lower-cased rcpt) must not stand twice in ``records``: the caller
    writes such records one at a time (an upsert cannot touch one row twice).
    """
    moves: list[tuple[str, str, str, float]] = []
    releases: list[tuple[str, str]] = []
    for record in records:
        if untouched(record):
            continue
        new = guard_after(record)
        if new is None:
            releases.append((record.rcpt.lower(), record.queue_id))
        else:
            moves.append((record.rcpt.lower(), record.queue_id, new.value, record.updated_at))
    if not moves and not releases:
        return None
    ctes: list[str] = []
    params: list[Any] = []
    if releases:
        ctes.append(
            f"released AS (DELETE FROM dedup WHERE message_key = %s AND state IN {_HELD_SQL}"
            f" AND (rcpt, queue_id) IN {values(len(releases), '(%s, %s)')})"
        )
        params += [message_key, *(part for release in releases for part in release)]
    if moves:
        pairs = pair_params((message_key, rcpt) for rcpt, *_ in moves)
        ctes.append(f"guard_locks AS ({locks(len(pairs) // 2)})")
        ctes.append(
            "moved AS (INSERT INTO dedup"
            " (message_key, rcpt, queue_id, state, updated_at, lease_until)"
            " SELECT %s, m.rcpt, m.holder, m.state, m.at, NULL"
            f" FROM {values(len(moves), '(%s, %s, %s, %s::float8)')}"
            " AS m(rcpt, holder, state, at) CROSS JOIN guard_locks"
            f"{_MOVE_GUARD})"
        )
        params += [*pairs, message_key, *(part for move in moves for part in move), ttl]
    return ", ".join(ctes), params
