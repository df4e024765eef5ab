"""The state store: the dedup ledger, the spool, dead letters and claims, behind one seam.

``open_store(config.delivery)`` picks the backend from ``delivery.store``: empty
is SQLite under ``state_dir`` (the embedded default), ``sqlite:///path`` a SQLite
file elsewhere, ``postgresql://...`` PostgreSQL for several instances (the
``postgresql`` extra, imported only when asked for). Callers depend on the role
protocols of :mod:`.base`, never on a backend class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from ..errors import StoreError
from .base import Health, Ledger, QueueAdmin, Quotas, Spool, StateStore
from .records import (
    FINAL_STATES,
    Admission,
    Guard,
    GuardState,
    MessageRecord,
    Notice,
    RecipientRecord,
    SpoolStats,
)
from .urls import redact_url, secrets_of

if TYPE_CHECKING:
    from ..config import DeliveryConfig

__all__ = [
    "FINAL_STATES",
    "STATE_FILE",
    "Admission",
    "Guard",
    "GuardState",
    "Health",
    "Ledger",
    "MessageRecord",
    "Notice",
    "QueueAdmin",
    "Quotas",
    "RecipientRecord",
    "Spool",
    "SpoolStats",
    "StateStore",
    "StoreError",
    "describe_store",
    "open_store",
    "sqlite_path",
    "store_secrets",
]

#: The SQLite file under ``delivery.state_dir`` when ``delivery.store`` is empty.
STATE_FILE: Final = "state.sqlite3"

_POSTGRES_SCHEMES: Final = ("postgresql", "postgres")


def sqlite_path(delivery: DeliveryConfig) -> Path | None:
    """The SQLite file the config names, or None when the store is PostgreSQL."""
    url = delivery.store
    if not url:
        return delivery.state_dir / STATE_FILE
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return Path(unquote(parts.path))
    return None


def describe_store(delivery: DeliveryConfig) -> str:
    """The store as logs and errors may name it: a path, or a URL without its password."""
    path = sqlite_path(delivery)
    if path is not None:
        return str(path)
    return redact_url(delivery.store or "")


def store_secrets(delivery: DeliveryConfig) -> list[str]:
    """The password a ``delivery.store`` URL carries, if any: scrubbed from every log line."""
    return secrets_of(delivery.store) if delivery.store else []


async def open_store(
    delivery: DeliveryConfig,
    *,
    clock: Callable[[], float] = time.time,
    create: bool = True,
) -> StateStore:
    """Open the store ``delivery`` names, creating or migrating its schema.

    ``create`` False refuses a SQLite file that does not exist yet (the CLI: a
    typo in ``state_dir`` must not make an empty store). Raises :class:`StoreError`
    naming the store, never its password.
    """
    path = sqlite_path(delivery)
    if path is not None:
        if not create and not path.exists():
            raise StoreError(f"no state store at {path} (has the daemon run?)", path=path)
        from .sqlite import SQLiteStore

        return await SQLiteStore.open(
            path,
            dedup_ttl=delivery.dedup_ttl,
            anonymous_ttl=delivery.anonymous_dedup_ttl,
            clock=clock,
        )
    url = delivery.store or ""
    if urlsplit(url).scheme not in _POSTGRES_SCHEMES:
        raise StoreError(f"delivery.store: unsupported scheme in {describe_store(delivery)}")
    try:
        from .postgres import PostgresStore
    except ImportError as exc:
        raise StoreError(
            "delivery.store is a PostgreSQL URL, but the PostgreSQL driver is not installed:"
            " pip install 'smtp-bridge[postgresql]'"
        ) from exc
    return await PostgresStore.open(
        url,
        dedup_ttl=delivery.dedup_ttl,
        anonymous_ttl=delivery.anonymous_dedup_ttl,
        claim_lease=delivery.claim_lease,
        clock=clock,
    )
