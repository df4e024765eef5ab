"""A reload (SIGHUP): the new config checked in full, and what it cannot change.

A new config is taken in full or not at all: :func:`load_new` loads the file,
checks it as a whole and builds its runtime (TLS files read), or names every
problem, and the service refuses the reload with them. Settings read once at
startup (:data:`RESTART_KEYS`) keep their old values until a restart;
:func:`warn_restart_needed` says which ones a reload changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError, TlsError
from .logs import log_event
from .smtp import Runtime

__all__ = ["RESTART_KEYS", "load_new", "warn_restart_needed"]

log = logging.getLogger("smtp_bridge.service")

#: Settings read once at startup; a reload that changes them logs that a
#: restart is needed (the rest takes effect for new sessions).
RESTART_KEYS = (
    ("delivery", "mode"),
    ("delivery", "state_dir"),
    ("delivery", "store"),
    ("delivery", "dedup_ttl"),
    ("smtp", "dual_stack"),  # open listeners keep their socket; new ones take the new value
)


def load_new(
    path: Path | None, adapt: Callable[[Config], Config]
) -> tuple[Config, Runtime] | list[str]:
    """The config at ``path`` (passed through ``adapt``) and its runtime, or why not."""
    if path is None:
        return ["no config file to reload: started with the built-in config"]
    try:
        config = adapt(load_config(path))
    except ConfigError as exc:
        return [str(i) for i in exc.issues]
    try:
        return config, Runtime.build(config)
    except TlsError as exc:  # the files changed since load_config read them
        return [f"smtp.tls: {exc}"]


def warn_restart_needed(old: Config, new: Config) -> None:
    """One warning naming the :data:`RESTART_KEYS` that differ, if any."""
    keys = [
        ".".join(key)
        for key in RESTART_KEYS
        if getattr(getattr(new, key[0]), key[1]) != getattr(getattr(old, key[0]), key[1])
    ]
    if keys:
        log_event(
            log,
            "reload_needs_restart",
            level=logging.WARNING,
            keys=keys,
            detail="these settings keep their old values until a restart",
        )
