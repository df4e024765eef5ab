"""A store that may not be open yet: the daemon starts on a full or read-only disk.

After a crash on a full or read-only disk the daemon used to exit at start (its
store could not be opened or migrated), and under systemd that is a restart loop
with clients refused. :class:`DeferredStore` stands in for the real store: until
it opens, every call raises :class:`StoreError` (so DATA gets ``451 4.3.0``,
never ``250``, and ``/readyz`` names the ``store`` check), while a background
task retries the opening with a growing pause. Once open, it delegates every
call to the real store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Any, Final

from ..logs import log_event
from ..outcomes import RecipientState
from .base import StateStore
from .records import (
    Admission,
    Guard,
    MessageRecord,
    Notice,
    RecipientRecord,
    SpoolStats,
    StoreError,
)

__all__ = ["DeferredStore"]

log = logging.getLogger("smtp_bridge.store")

#: First pause between attempts to open, doubled after each failure up to the cap.
FIRST_RETRY: Final = 0.5
MAX_RETRY: Final = 15.0


class DeferredStore:
    """A :class:`StateStore` that opens the real one, now or later, by itself.

    ``opener`` opens the real store and makes it ready (recovers claims); it
    raises StoreError when it cannot. ``on_open`` runs once the real store is
    open (the service starts the spool workers then).
    """

    def __init__(
        self,
        opener: Callable[[], Awaitable[StateStore]],
        *,
        name: str,
        dedup_ttl: float,
        on_open: Callable[[], None] | None = None,
        first_retry: float = FIRST_RETRY,
        max_retry: float = MAX_RETRY,
    ) -> None:
        self._opener = opener
        self._name = name
        self._dedup_ttl = dedup_ttl
        self.on_open = on_open
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._store: StateStore | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._closed = False
        #: Why the store is not open (the last error), '' once open.
        self.error = "not opened yet"

    # -- opening ------------------------------------------------------------------

    async def start(self) -> bool:
        """Try to open now; on failure keep trying in the background. True if open."""
        if await self._try_open(first=True):
            return True
        self._retrying = asyncio.get_running_loop().create_task(self._retry())
        return False

    @property
    def is_open(self) -> bool:
        return self._store is not None

    @property
    def real(self) -> StateStore | None:
        """The real store once open (for roles beyond StateStore), else None."""
        return self._store

    async def _try_open(self, *, first: bool = False) -> bool:
        try:
            store = await self._opener()
        except StoreError as exc:
            if first or str(exc) != self.error:
                log_event(
                    log,
                    "store_unavailable",
                    level=logging.ERROR,
                    store=self._name,
                    error=str(exc),
                    detail="mail gets 451 4.3.0 until the store opens; retrying",
                )
            self.error = str(exc)
            return False
        if self._closed:  # shutdown began while it was opening
            await store.close()
            return False
        self._store, self.error = store, ""
        if not first:
            log_event(log, "store_opened", store=self._name)
        if self.on_open is not None:
            self.on_open()
        return True

    async def _retry(self) -> None:
        pause = self._first_retry
        while not self._closed:
            await asyncio.sleep(pause)
            if await self._try_open():
                return
            pause = min(pause * 2, self._max_retry)

    def _real(self) -> StateStore:
        if self._store is None:
            raise StoreError(f"state store {self._name} is not open: {self.error}")
        return self._store

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (tests reach the SQLite writer), once open.
        store = self.__dict__.get("_store")
        if store is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(store, name)

    # -- StateStore -----------------------------------------------------------------

    def on_spooled(self, callback: Callable[[], None]) -> None:
        """Passed to the real store (call it once open: the service does, on open)."""
        self._real().on_spooled(callback)

    @property
    def name(self) -> str:
        return self._name

    @property
    def dedup_ttl(self) -> float:
        return self._dedup_ttl

    async def close(self) -> None:
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        if self._store is not None:
            await self._store.close()

    async def check_writable(self) -> bool:
        return self._store is not None and await self._store.check_writable()

    async def previous_outcomes(
        self, message_key: str, rcpts: Iterable[str]
    ) -> dict[str, RecipientState]:
        return await self._real().previous_outcomes(message_key, rcpts)

    async def open_message(
        self, message: MessageRecord, rcpts: Sequence[str], *, lease: float
    ) -> Admission:
        return await self._real().open_message(message, rcpts, lease=lease)

    async def acquire(
        self, message_key: str, rcpts: Sequence[str], *, queue_id: str, lease: float
    ) -> dict[str, Guard]:
        return await self._real().acquire(message_key, rcpts, queue_id=queue_id, lease=lease)

    async def record_outcomes(
        self,
        queue_id: str,
        recipients: Sequence[RecipientRecord],
        *,
        message_key: str,
        spool: bytes | None = None,
        mode: str = "hybrid",
    ) -> None:
        await self._real().record_outcomes(
            queue_id, recipients, message_key=message_key, spool=spool, mode=mode
        )

    async def add_message(
        self, message: MessageRecord, recipients: Sequence[RecipientRecord]
    ) -> Admission:
        return await self._real().add_message(message, recipients)

    async def update_recipient(
        self,
        record: RecipientRecord,
        *,
        message_key: str,
        notice: Notice | None = None,
        claim: bool = False,
    ) -> bool:
        return await self._real().update_recipient(
            record, message_key=message_key, notice=notice, claim=claim
        )

    async def claim_due(
        self, *, now: float, limit: int, lease: float
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        return await self._real().claim_due(now=now, limit=limit, lease=lease)

    async def renew_claim(self, queue_id: str, rcpt: str, *, lease: float) -> bool:
        return await self._real().renew_claim(queue_id, rcpt, lease=lease)

    async def release_claim(self, queue_id: str, rcpt: str, *, next_attempt: float) -> None:
        await self._real().release_claim(queue_id, rcpt, next_attempt=next_attempt)

    async def recover_claims(self) -> int:
        return await self._real().recover_claims()

    async def resolve_stale(self, *, older_than: float) -> int:
        return await self._real().resolve_stale(older_than=older_than)

    async def next_due(self) -> float | None:
        return await self._real().next_due()

    async def purge_expired(self, now: float | None = None) -> int:
        return await self._real().purge_expired(now)

    async def spool_stats(self) -> SpoolStats:
        return await self._real().spool_stats()

    async def dead_letters(self) -> int:
        return await self._real().dead_letters()

    async def get_message(
        self, queue_id: str
    ) -> tuple[MessageRecord, list[RecipientRecord]] | None:
        return await self._real().get_message(queue_id)

    async def list_queue(
        self, *, dead: bool = False, limit: int = 1000
    ) -> list[tuple[MessageRecord, RecipientRecord]]:
        return await self._real().list_queue(dead=dead, limit=limit)

    async def list_recipients(
        self, *, states: Collection[RecipientState] | None = None, limit: int = 100
    ) -> list[RecipientRecord]:
        return await self._real().list_recipients(states=states, limit=limit)

    async def retry(self, queue_id: str | None = None) -> tuple[int, int]:
        return await self._real().retry(queue_id)

    async def purge(self, queue_id: str | None = None, *, dead: bool = False) -> int:
        return await self._real().purge(queue_id, dead=dead)

    async def counts(self) -> dict[str, int]:
        return await self._real().counts()

    async def take_quota(
        self, name: str, key: str, *, window: float, limit: int, now: float | None = None
    ) -> bool:
        return await self._real().take_quota(name, key, window=window, limit=limit, now=now)
