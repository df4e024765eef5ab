"""One worker process of ``serve --workers N``: who it is, its share of the
daemon-wide limits, and the service it runs.

The supervisor (supervisor.py) hands each worker its :class:`WorkerSlot` in
``$SMTP_BRIDGE_WORKER``. Every config the worker takes, at startup and at each
reload, is cut to its share (:func:`worker_config`), so the configured totals
are never exceeded by the N of them together.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import StartupError
from .listeners import IMPLICIT_TLS_KEY
from .logs import log_event
from .service import BridgeService

__all__ = [
    "EXIT_OK",
    "EXIT_STARTUP",
    "WORKER_ENV",
    "WorkerService",
    "WorkerSlot",
    "serve_worker",
    "worker_config",
]

log = logging.getLogger("smtp_bridge.supervisor")

#: The supervisor -> worker handshake: JSON ``{"index", "count", "listen"}``.
WORKER_ENV = "SMTP_BRIDGE_WORKER"
EXIT_OK = 0
EXIT_STARTUP = 2


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Who a worker is: its index, how many there are, the resolved listen addresses."""

    index: int
    count: int
    listen: dict[str, str] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps({"index": self.index, "count": self.count, "listen": self.listen})

    @classmethod
    def from_env(cls, value: str) -> WorkerSlot:
        doc = json.loads(value)
        return cls(int(doc["index"]), int(doc["count"]), dict(doc.get("listen") or {}))


def _share(total: int, count: int) -> int:
    return max(1, math.ceil(total / count))


def worker_config(config: Config, slot: WorkerSlot) -> Config:
    """``config`` as worker ``slot`` runs it: its share of the daemon-wide limits."""
    smtp, api = config.smtp, config.api
    update: dict[str, Any] = {
        "listen": [slot.listen.get(a, a) for a in smtp.listen],
        "max_connections": _share(smtp.max_connections, slot.count),
        "max_connections_per_ip": _share(smtp.max_connections_per_ip, slot.count),
    }
    if smtp.tls is not None:
        implicit = [slot.listen.get(IMPLICIT_TLS_KEY + a, a) for a in smtp.tls.implicit_listen]
        update["tls"] = smtp.tls.model_copy(update={"implicit_listen": implicit})
    api_update = {
        "rate_limit": api.rate_limit / slot.count,
        "max_concurrency": _share(api.max_concurrency, slot.count),
    }
    sections: dict[str, Any] = {
        "smtp": smtp.model_copy(update=update),
        "api": api.model_copy(update=api_update),
    }
    if slot.index != 0:
        sections["admin"] = config.admin.model_copy(update={"listen": None})
    return config.model_copy(update=sections)


class WorkerService(BridgeService):
    """A :class:`BridgeService` run as one of ``--workers``: SO_REUSEPORT listeners,
    and every config it takes (startup and each reload) cut to its share."""

    reuse_port = True

    def __init__(self, config: Config, slot: WorkerSlot, **kwargs: Any) -> None:
        self.slot = slot  # before BridgeService.__init__, which takes the config
        super().__init__(config, **kwargs)

    def _with_sandbox(self, config: Config) -> Config:
        # BridgeService passes every config it takes through here.
        return worker_config(super()._with_sandbox(config), self.slot)


def serve_worker(
    slot: WorkerSlot,
    config: Config,
    config_path: Path | None,
    *,
    sandbox: bool,
    run: Callable[[Coroutine[Any, Any, Any]], Any],
) -> int:
    """Run the service of worker ``slot`` until it stops: its exit code."""
    service = WorkerService(config, slot, config_path=config_path, sandbox=sandbox)
    try:
        run(service.run())
    except StartupError as exc:
        log_event(log, "cannot_start", level=logging.ERROR, worker=slot.index, error=str(exc))
        return EXIT_STARTUP
    return EXIT_OK
