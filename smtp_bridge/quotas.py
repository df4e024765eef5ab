"""``quotas:`` (docs/configuration.md): recipients per window, checked at RCPT, in the store.

A runaway cron job or a compromised app must not burn the provider balance:
each quota whose envelope conditions match counts the recipient under its key
(the client address, the AUTH user, the sender or the route) and, once the
window's count is reached, RCPT gets ``451 4.7.1`` naming the quota (the client
keeps the mail and retries later). The counts live in the state store
(:class:`~smtp_bridge.store.Quotas`), so instances sharing a PostgreSQL store
share them; on SQLite they are the host's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .config import QuotaConfig, RouteConfig
from .logs import log_event
from .metrics import Metrics
from .replies import Reply
from .rules import Envelope, envelope_matches
from .store import Quotas

__all__ = ["quota_key", "quota_reply", "take_quotas"]

log = logging.getLogger("smtp_bridge.quotas")


def quota_key(quota: QuotaConfig, envelope: Envelope, route: RouteConfig | None) -> str:
    """What ``quota`` counts by for this recipient.

    ``user`` without AUTH and ``route`` before the content decides the route are
    '' (one shared count); ``mail_from`` is lower-cased, '' for the null sender.
    """
    if quota.per == "client":
        ip = envelope.client_ip
        if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip) if ip is not None else ""
    if quota.per == "user":
        return envelope.user
    if quota.per == "mail_from":
        return "" if envelope.mail_from in ("", "<>") else envelope.mail_from.lower()
    return route.name if route is not None else ""


async def take_quotas(
    store: Quotas,
    quotas: Sequence[QuotaConfig],
    envelope: Envelope,
    route: RouteConfig | None,
) -> tuple[QuotaConfig, str] | None:
    """Count the recipient against every matching quota, in order: the first quota
    (and key) that has no room left, or None. Raises StoreError."""
    for quota in quotas:
        if not envelope_matches(quota.match, envelope):
            continue
        key = quota_key(quota, envelope, route)
        rate = quota.recipients
        if not await store.take_quota(quota.name, key, window=rate.window, limit=rate.count):
            return quota, key
    return None


async def quota_reply(
    store: Quotas,
    quotas: Sequence[QuotaConfig],
    envelope: Envelope,
    route: RouteConfig | None,
    *,
    metrics: Metrics,
    session: str,
) -> str | None:
    """The RCPT reply when a quota is exhausted (``451 4.7.1`` naming it), else None.

    Logged (``quota_exceeded``) and counted (``smtp_bridge_quota_exceeded_total``).
    Raises StoreError: the caller answers 451 4.3.0, as DATA would.
    """
    over = await take_quotas(store, quotas, envelope, route)
    if over is None:
        return None
    quota, key = over
    log_event(
        log,
        "quota_exceeded",
        level=logging.WARNING,
        session=session,
        quota=quota.name,
        per=quota.per,
        key=key,
        limit=str(quota.recipients),
        rcpt=envelope.rcpt,
    )
    metrics.quota_exceeded.labels(quota=quota.name).inc()
    metrics.rcpt_rejected.labels(reason="quota").inc()
    reply = Reply(451, "4.7.1", f"Quota {quota.name} exceeded ({quota.recipients}), try later")
    return str(reply)
