"""The spool's operator actions, one code path for ``smtp-bridge queue`` and the console.

Both call these on the store's :class:`~smtp_bridge.store.QueueAdmin` role, so a
retry from the web page and one from the shell do exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .store import MessageRecord, QueueAdmin, RecipientRecord

__all__ = [
    "ALL",
    "Progress",
    "PurgeResult",
    "RetryResult",
    "list_queue",
    "purge",
    "retry",
    "show",
]

#: ``list_queue``'s limit when every dead letter is wanted (``retry --all-dead``).
ALL = 10**9

#: Called as ``progress(done, total)`` after each message of a long run.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class RetryResult:
    """Recipients due now, dead letters without content, and queue ids not found."""

    queued: int = 0
    stuck: int = 0
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """Recipient rows deleted and queue ids not found."""

    removed: int = 0
    missing: list[str] = field(default_factory=list)


async def list_queue(
    store: QueueAdmin, *, dead: bool = False, limit: int = 1000
) -> list[tuple[MessageRecord, RecipientRecord]]:
    """Waiting recipients (or dead letters), oldest first."""
    return await store.list_queue(dead=dead, limit=limit)


async def show(
    store: QueueAdmin, queue_id: str
) -> tuple[MessageRecord, list[RecipientRecord]] | None:
    """One spooled message and its recipients, or None."""
    return await store.get_message(queue_id)


async def retry(
    store: QueueAdmin, queue_ids: Sequence[str] | None, *, progress: Progress | None = None
) -> RetryResult:
    """Put the dead letters of ``queue_ids`` (None: every dead letter) back in the spool.

    Waiting recipients of a named message become due now too. With ``progress``,
    every dead letter is retried message by message so a long run can be followed;
    without, all at once in one transaction.
    """
    if queue_ids is None:
        if progress is None:
            queued, stuck = await store.retry(None)
            return RetryResult(queued, stuck)
        rows = await store.list_queue(dead=True, limit=ALL)
        queue_ids = list(dict.fromkeys(m.queue_id for m, _ in rows))
    queued = stuck = 0
    missing: list[str] = []
    for done, queue_id in enumerate(queue_ids, 1):
        if await store.get_message(queue_id) is None:
            missing.append(queue_id)
        else:
            q, s = await store.retry(queue_id)
            queued, stuck = queued + q, stuck + s
        if progress is not None:
            progress(done, len(queue_ids))
    return RetryResult(queued, stuck, missing)


async def purge(
    store: QueueAdmin, queue_ids: Sequence[str] | None, *, progress: Progress | None = None
) -> PurgeResult:
    """Delete the messages ``queue_ids``, or (None) every dead letter."""
    if queue_ids is None:
        return PurgeResult(await store.purge(dead=True))
    removed = 0
    missing: list[str] = []
    for done, queue_id in enumerate(queue_ids, 1):
        if await store.get_message(queue_id) is None:
            missing.append(queue_id)
        else:
            removed += await store.purge(queue_id)
        if progress is not None:
            progress(done, len(queue_ids))
    return PurgeResult(removed, missing)
