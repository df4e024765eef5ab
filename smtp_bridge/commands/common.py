"""What the commands share: exit codes, the config they load, a failure's line, the loop."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from ..config import DEFAULT_CONFIG_PATH, Config, load_config
from ..errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "EXIT_CONFIG",
    "EXIT_OK",
    "EXIT_STARTUP",
    "config_arg",
    "fail",
    "load",
    "load_or_report",
    "run",
]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STARTUP = 2

#: Sets the default of ``--config`` (docs/cli.md).
CONFIG_ENV = "SMTP_BRIDGE_CONFIG"


def config_arg(path: str | None) -> str | None:
    """``--config``, else ``$SMTP_BRIDGE_CONFIG``, else None (the built-in default)."""
    return path or os.environ.get(CONFIG_ENV) or None


def load(path: str | None) -> Config:
    """The config named by ``--config`` or the environment, else the default file."""
    return load_config(config_arg(path) or DEFAULT_CONFIG_PATH)


def load_or_report(path: str | None) -> Config | None:
    """The config, or None once each of its problems is printed to stderr."""
    try:
        return load(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def fail(message: str) -> int:
    """Print ``smtp-bridge: message`` to stderr; the exit status to return (EXIT_CONFIG)."""
    print(f"smtp-bridge: {message}", file=sys.stderr)
    return EXIT_CONFIG


def run(coro: Any) -> Any:
    """Run ``coro`` to the end on uvloop where it is installed, else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)
