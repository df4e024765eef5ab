"""The daemon's state store at start: open now, or retrying in the background,
and the spool taken over once it opens.

A store that cannot be opened (full or read-only disk) does not stop the start:
mail gets 451 4.3.0 and /readyz says why until it opens by itself. A database
that cannot be reached at start is most often a wrong URL, password or firewall:
the daemon says so and stops (systemd retries), where a full local disk is
weathered with 451s until it has room again.
"""

from __future__ import annotations

import functools
import logging

from .config import Config
from .errors import StartupError, StoreError
from .logs import log_event
from .policy import session_lease
from .store import StateStore, describe_store, open_store, sqlite_path
from .store.deferred import DeferredStore

__all__ = ["start_store"]

log = logging.getLogger("smtp_bridge.service")


async def start_store(config: Config) -> DeferredStore:
    """The store of ``config.delivery``, open or opening. StartupError for a
    database that cannot be reached (nothing left open)."""
    store = DeferredStore(
        functools.partial(_open_ready_store, config),
        name=describe_store(config.delivery),
        dedup_ttl=config.delivery.dedup_ttl,
    )
    if not await store.start() and sqlite_path(config.delivery) is None:
        await store.close()
        raise StartupError(f"state store: {store.error}")
    return store


async def _open_ready_store(config: Config) -> StateStore:
    """Open the store and take over the spool: claims left by a process that died
    are due again, stale in-flight rows settled. StoreError, with nothing left
    open, when any of it fails."""
    store = await open_store(config.delivery)
    try:
        recovered = await store.recover_claims()
        settled = await store.resolve_stale(older_than=2 * session_lease(config))
    except StoreError:
        await store.close()
        raise
    if recovered:
        log_event(log, "spool_recovered", level=logging.WARNING, recipients=recovered)
    if settled:
        log_event(log, "stale_settled", level=logging.WARNING, rows=settled)
    return store
