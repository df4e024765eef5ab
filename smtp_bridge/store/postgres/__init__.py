"""The PostgreSQL state store (several instances, one bridge): being built."""

from __future__ import annotations

from collections.abc import Callable

from ...errors import StoreError
from ..base import StateStore

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
