"""LISTEN for ``smtp_bridge_spool``: any instance's new spool work wakes every instance.

Writes that put content in the spool ``NOTIFY`` in their own transaction, so the
notification is sent only if (and when) they commit. One dedicated autocommit
connection per store listens and calls the registered callbacks on the event
loop. If it drops (the server restarted), it reconnects with a growing backoff
and then calls the callbacks once, since notifications sent meanwhile are lost;
the workers' ``idle_poll`` remains the fallback either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Final

import psycopg

__all__ = ["CHANNEL", "SpoolListener"]

#: The notification channel.
CHANNEL: Final = "smtp_bridge_spool"

_log = logging.getLogger("smtp_bridge.store")

_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 5.0


class SpoolListener:
    """The listening connection's task and the callbacks it calls."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_kwargs: dict[str, Any],
        scrub: Callable[[str], str],
    ) -> None:
        self._url = url
        self._name = name
        self._connect_kwargs = connect_kwargs
        self._scrub = scrub
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Set while LISTEN is in effect (tests wait for it before notifying).
        self.ready = asyncio.Event()

    def add(self, callback: Callable[[], None]) -> None:
        """Register ``callback``; the first one starts the listening task."""
        if self._closed:
            return
        self._callbacks.append(callback)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="smtp-bridge-store-listener"
            )

    async def close(self) -> None:
        """Stop listening and close the connection."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _fire(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                _log.exception("spool notification callback failed")

    async def _run(self) -> None:
        delay = _BACKOFF_FIRST
        connected_before = False
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, **self._connect_kwargs
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    delay = _BACKOFF_FIRST
                    if connected_before:
                        self._fire()  # what was notified while we were away is lost
                    connected_before = True
                    async for _ in conn.notifies():
                        self._fire()
            except psycopg.Error as exc:
                self.ready.clear()
                _log.warning(
                    "state store %s: spool notifications interrupted, retrying in %.1fs: %s",
                    self._name,
                    delay,
                    self._scrub(str(exc)),
                )
            self.ready.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)
