"""``serve`` runs the daemon in the foreground, ``sandbox`` the AOTsend-compatible local API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, Config, parse_config
from ..errors import ConfigError, StartupError
from ..logs import configure_logging, log_event
from .common import EXIT_CONFIG, EXIT_OK, EXIT_STARTUP, config_arg, load, run

__all__ = ["SANDBOX_CONFIG", "cmd_sandbox", "cmd_serve"]

#: ``serve --sandbox`` with no config file: a catch-all route, so a newcomer
#: sees mail flow end to end before writing any YAML.
SANDBOX_CONFIG = """
smtp:
  listen: ["127.0.0.1:2525"]
  hostname: localhost
delivery:
  state_dir: {state_dir}
admin:
  listen: "127.0.0.1:9025"
routes:
  - name: everything
    template_id: "sandbox-template"
    alias: "{{{{ sender.name or 'smtp-bridge' }}}}"
    data:
      subject: "{{{{ subject }}}}"
      body: "{{{{ text }}}}"
"""


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service import BridgeService, settle_heap

    configure_logging(args.log_format, args.log_level)
    try:
        config = _load(args.config, sandbox=args.sandbox)
    except ConfigError as exc:
        _log_errors("config_error", [str(issue) for issue in exc.issues])
        return EXIT_CONFIG
    given = config_arg(args.config)
    config_path = (
        Path(given) if given else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    )
    settle_heap()
    if args.workers > 1 or os.environ.get("SMTP_BRIDGE_WORKER"):
        from ..supervisor import serve_workers

        return serve_workers(args, config, config_path, run)
    service = BridgeService(config, config_path=config_path, sandbox=args.sandbox)
    try:
        run(service.run())
    except StartupError as exc:
        _log_errors("cannot_start", [str(exc)])
        return EXIT_STARTUP
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from ..config import split_host_port
    from ..sandbox import run_sandbox

    configure_logging(args.log_format, args.log_level)
    host, port = split_host_port(args.listen)
    templates = [t for t in (args.templates or "").split(",") if t] or None
    with contextlib.suppress(KeyboardInterrupt):
        run(
            run_sandbox(host, port, app_key=args.app_key, templates=templates, latency=args.latency)
        )
    return EXIT_OK


def _load(path: str | None, *, sandbox: bool) -> Config:
    """The config; with ``--sandbox`` and no config file anywhere, SANDBOX_CONFIG."""
    if sandbox and config_arg(path) is None and not DEFAULT_CONFIG_PATH.exists():
        text = SANDBOX_CONFIG.format(state_dir=json.dumps(str(_default_state_dir())))
        return parse_config(text, filename="<built-in sandbox config>")
    return load(path)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "smtp-bridge"


def _log_errors(event: str, errors: Sequence[str]) -> None:
    """``serve``'s start-up errors as log lines (JSON with ``--log-format json``, the
    default): a log collector parsing the daemon's stderr never meets plain text."""
    log = logging.getLogger("smtp_bridge.cli")
    for error in errors:
        log_event(log, event, level=logging.ERROR, error=error)
