"""File descriptors: does RLIMIT_NOFILE cover what the config lets the daemon open?

systemd's default soft limit is 1024 descriptors, the default
``smtp.max_connections`` is 1000: under a flood the daemon ran out of them,
and ``/healthz`` (a descriptor too) failed with the rest. At start (and on a
reload that raises the need) the daemon counts what it may hold open at once,
raises its soft limit up to the hard one when that is short, and refuses to
start, with the numbers, when even the hard limit is.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Final

from .config import Config
from .errors import StartupError

__all__ = ["FdPlan", "ensure_fd_limit", "fd_plan"]

#: The state store: SQLite's writer and reader connections, each with the
#: database, its WAL and its shared-memory file (a PostgreSQL pool: its sockets).
STORE_FDS: Final = 24
#: The admin endpoint: its listener and a few scrapes or probes at once.
ADMIN_FDS: Final = 16
#: Everything else: stdio, the event loop's epoll and self-pipe, the TLS and
#: config files a reload reads, the sandbox, the scrypt and store threads.
MARGIN_FDS: Final = 64

#: The soft limit asked for when raising it: what the shipped unit sets.
HEADROOM_FDS: Final = 65536


@dataclass(frozen=True, slots=True)
class FdPlan:
    """Descriptors the config may hold open at once, by what holds them."""

    connections: int
    api: int
    listeners: int
    store: int = STORE_FDS
    admin: int = ADMIN_FDS
    margin: int = MARGIN_FDS

    @property
    def total(self) -> int:
        return self.connections + self.api + self.listeners + self.store + self.admin + self.margin

    def describe(self) -> str:
        return (
            f"smtp.max_connections {self.connections} + api.max_concurrency {self.api}"
            f" + listeners {self.listeners} + store {self.store} + admin {self.admin}"
            f" + margin {self.margin}"
        )


def fd_plan(config: Config) -> FdPlan:
    """One socket per SMTP connection, one per API connection, one per listener."""
    smtp = config.smtp
    implicit = len(smtp.tls.implicit_listen) if smtp.tls is not None else 0
    return FdPlan(
        connections=smtp.max_connections,
        api=config.api.max_concurrency,
        listeners=len(smtp.listen) + implicit,
    )


def ensure_fd_limit(plan: FdPlan) -> tuple[int, int] | None:
    """Make the soft RLIMIT_NOFILE cover ``plan``: (old, new) soft limit when raised,
    None when it already did. :class:`StartupError` when the hard limit is too low.
    """
    need = plan.total
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        raise StartupError(
            f"the open file limit (RLIMIT_NOFILE) is {soft} (hard limit {hard}), below the"
            f" {need} descriptors this config may need ({plan.describe()}): raise"
            " LimitNOFILE= in the systemd unit (or `ulimit -n`), or lower smtp.max_connections"
        )
    # Headroom beyond the bare need (as LimitNOFILE=65536 gives), within the hard limit.
    new = max(need, HEADROOM_FDS)
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError) as exc:
        raise StartupError(
            f"the open file limit (RLIMIT_NOFILE) is {soft}, below the {need} descriptors"
            f" this config may need ({plan.describe()}), and raising it failed: {exc}"
        ) from None
    return soft, new
