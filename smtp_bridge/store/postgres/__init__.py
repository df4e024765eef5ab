"""The PostgreSQL state store (several instances, one bridge): being built."""

from __future__ import annotations

from collections.abc import Callable

from ..base import StateStore
from ..records import StoreError

__all__ = ["PostgresStore"]


class PostgresStore:
    """Placeholder until the backend lands: refuses to open."""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        dedup_ttl: float,
        anonymous_ttl: float,
        claim_lease: float,
        clock: Callable[[], float],
    ) -> StateStore:
        raise StoreError("the PostgreSQL state store is not built yet")
