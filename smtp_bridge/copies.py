"""Copies of one message delivered at once: each recipient is called for once.

A client that gave up and retries, or the same message sent twice, is a copy:
the same message key (:mod:`smtp_bridge.identity`). Copies in this process wait
for each other (:class:`InFlight`) before asking the ledger; a copy in another
process holds its recipients' guards, and :func:`wait_for_copies` waits for its
calls to end, never longer than its lease. A recipient another copy has is
reported as that copy's (:func:`held_elsewhere`, :func:`as_copy`), never sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from . import replies
from .logs import log_event
from .outcomes import RecipientState
from .policy import GUARD_MARGIN, RecipientOutcome, duplicate_outcome
from .store import Guard, GuardState, Ledger

__all__ = ["GUARD_POLL", "InFlight", "as_copy", "held_elsewhere", "note_reuse", "wait_for_copies"]

log = logging.getLogger("smtp_bridge.delivery")

#: How often a copy waiting for another copy's call looks at the ledger again.
GUARD_POLL = 0.1

#: (message key, lower-cased rcpt)
Pair = tuple[str, str]


class InFlight:
    """This process's deliveries in flight, per (message key, lower-cased recipient)."""

    def __init__(self) -> None:
        # pair -> done when its delivery is recorded.
        self._done: dict[Pair, asyncio.Future[None]] = {}

    def busy(self, pairs: Sequence[Pair]) -> set[asyncio.Future[None]]:
        """What another copy here has of ``pairs``: wait for these, then ask again."""
        return {self._done[p] for p in pairs if p in self._done}

    def hold(self, pairs: Sequence[Pair]) -> asyncio.Future[None]:
        """Take ``pairs``: copies that come meanwhile wait until :meth:`release`."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done.update(dict.fromkeys(pairs, done))
        return done

    def release(self, pairs: Sequence[Pair], done: asyncio.Future[None]) -> None:
        """The delivery that :meth:`hold` returned ``done`` for is recorded."""
        for pair in pairs:
            if self._done.get(pair) is done:
                del self._done[pair]
        done.set_result(None)


async def wait_for_copies(
    store: Ledger, key: str, guards: Mapping[str, Guard], *, queue_id: str, lease: float
) -> dict[str, Guard]:
    """Recipients whose call another copy has in flight: wait for its end, then ask again.

    Never longer than that copy's lease can last (then it is presumed dead and
    the guard is ours, as a possible duplicate); if it is still held after
    that, the recipient gets ``SAME_IN_FLIGHT`` (451, :func:`held_elsewhere`).
    """
    deadline = time.monotonic() + lease + GUARD_MARGIN
    guards = dict(guards)
    while True:
        busy = [
            rcpt
            for rcpt, guard in guards.items()
            if not guard.acquired and guard.state is GuardState.SENDING
        ]
        if not busy or time.monotonic() >= deadline:
            return guards
        # Copies in this process were waited for (InFlight) before the message
        # was opened: a guard still held is another process's.
        await asyncio.sleep(GUARD_POLL)
        guards.update(await store.acquire(key, busy, queue_id=queue_id, lease=lease))


def held_elsewhere(queue_id: str, rcpt: str, guard: Guard) -> RecipientOutcome | None:
    """The outcome of a recipient whose guard another copy holds; None when it is ours."""
    if guard.acquired:
        return None
    if guard.state is GuardState.SENDING:
        # Still in flight elsewhere after waiting as long as its lease: keep the mail.
        return RecipientOutcome(rcpt, RecipientState.RETRYING, replies.SAME_IN_FLIGHT)
    # Another copy has it: delivered already, or waiting in its spool.
    return _skipped(queue_id, rcpt, guard)


def as_copy(
    queue_id: str, outcome: RecipientOutcome, guards: Mapping[str, Guard]
) -> RecipientOutcome:
    """A spooled outcome whose guard another copy holds: that copy sends it."""
    guard = guards.get(outcome.rcpt.lower())
    if not outcome.spooled or guard is None or guard.acquired:
        return outcome
    return _skipped(queue_id, outcome.rcpt, guard, outcome.route)


def _skipped(queue_id: str, rcpt: str, guard: Guard, route: str = "") -> RecipientOutcome:
    log_event(
        log,
        "duplicate_skipped",
        queue_id=queue_id,
        previous_queue_id=guard.holder,
        rcpt=rcpt,
        held=guard.state.value if guard.state else "",
    )
    return duplicate_outcome(rcpt, guard.state, route)


def note_reuse(queue_id: str, message_id: str, earlier: str) -> None:
    """Say so when the ledger found this Message-ID on another message (``earlier``)."""
    if earlier:
        log_event(
            log,
            "message_id_reused",
            level=logging.WARNING,
            queue_id=queue_id,
            previous_queue_id=earlier,
            message_id=message_id[:200],
        )
