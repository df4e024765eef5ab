"""Putting a recipient's end on record, written once for sessions and queue workers.

Once a call was made its outcome must reach the ledger, or the next attempt could
not know to skip the recipient (docs/guarantees.md): :func:`write_until_recorded`
retries the write with backoff until the store takes it. Queue workers run it
inline under ``asyncio.shield``; a session whose write before the reply failed
keeps it going in the background (:class:`LateWrites`). :func:`bury` makes a
recipient a dead letter, its failure notice spooled in the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from .config import Config
from .errors import StoreError
from .logs import log_event
from .outcomes import RecipientState
from .policy import Origin, RecipientOutcome, dead_letter
from .store import Notice, RecipientRecord

__all__ = ["RECORD_RETRY", "LateWrites", "bury", "write_until_recorded"]

log = logging.getLogger("smtp_bridge.delivery")

#: Backoff between tries of an outcome write that failed (the call was made).
RECORD_RETRY: Final = (0.2, 0.5, 1.0, 2.0, 5.0)

T = TypeVar("T")


def _never() -> bool:
    return False


async def write_until_recorded(
    write: Callable[[], Awaitable[T]],
    *,
    about: Mapping[str, Any],
    failed: int = 0,
    stopping: Callable[[], bool] = _never,
    retry_fields: Mapping[str, Any] | None = None,
) -> tuple[T, int]:
    """``write()`` until the store takes it; its result, and how many tries failed.

    ``failed``: tries already made (a session's, before its reply). Each retry
    waits the next step of :data:`RECORD_RETRY`; with ``retry_fields`` each failed
    try is a ``store_error`` line. Only a stop ends the retries: the task cancelled
    (then one last try), or ``stopping()`` when a retry failed too. If the write is
    still not on record then, the line ``outcome_unrecorded`` (with ``about``) says
    what the ledger does not know; the cancellation or the StoreError is raised.
    """
    tries = failed
    while True:
        try:
            if tries:
                await asyncio.sleep(RECORD_RETRY[min(tries, len(RECORD_RETRY)) - 1])
            return await write(), tries
        except StoreError as exc:
            tries += 1
            if stopping() and tries > 1:
                _unrecorded(about, exc)
                raise
            if retry_fields is not None:
                log_event(
                    log,
                    "store_error",
                    level=logging.ERROR,
                    **retry_fields,
                    error=str(exc),
                    retry=tries,
                )
        except asyncio.CancelledError:
            try:
                await write()
            except StoreError as exc:
                _unrecorded(about, exc)
            raise


def _unrecorded(about: Mapping[str, Any], exc: StoreError) -> None:
    log_event(log, "outcome_unrecorded", level=logging.ERROR, **about, error=str(exc))


class LateWrites:
    """A session's outcome writes that failed after its calls, retried in the background.

    Until each is on record the recipients' guards say SENDING, so no copy sends
    them again; :meth:`close` gives each a last try.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def keep(
        self, queue_id: str, records: Sequence[RecipientRecord], write: Callable[[], Awaitable[Any]]
    ) -> None:
        """Retry ``write`` (of ``records``) until the store takes it, or until :meth:`close`."""
        about = {
            "queue_id": queue_id,
            "rcpts": [r.rcpt for r in records],
            "states": [RecipientState(r.state).value for r in records],
        }
        task = asyncio.get_running_loop().create_task(self._until_recorded(write, about))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _until_recorded(
        self, write: Callable[[], Awaitable[Any]], about: Mapping[str, Any]
    ) -> None:
        _, tries = await write_until_recorded(write, about=about, failed=1)
        log_event(log, "outcome_recorded_late", queue_id=about["queue_id"], tries=tries)

    async def close(self) -> None:
        """Stop retrying: each write gets a last try, or is logged ``outcome_unrecorded``."""
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def bury(
    outcome: RecipientOutcome,
    origin: Origin,
    write: Callable[[RecipientRecord, Notice | None], Awaitable[object]],
    *,
    config: Config,
    reason: str,
    now: float,
    wake: Callable[[], None],
    columns: Mapping[str, Any] | None = None,
    **fields: Any,
) -> RecipientOutcome:
    """Make ``outcome`` a dead letter (docs/guarantees.md); return its DEAD outcome.

    ``write`` puts its record (with ``columns``) and the failure notice on record in
    one transaction; then the workers are woken for the notice. ``fields`` go on the
    ``dead_letter`` line. Raises what ``write`` raises (the notice is then not spooled).
    """
    dead, notice = dead_letter(outcome, origin, config=config, reason=reason, now=now, **fields)
    await write(dead.record(origin.queue_id, now=now, **(columns or {})), notice)
    if notice is not None:
        log_event(
            log,
            "notice_spooled",
            queue_id=notice[0].queue_id,
            origin=origin.queue_id,
            rcpt=dead.rcpt,
        )
        wake()
    return dead
