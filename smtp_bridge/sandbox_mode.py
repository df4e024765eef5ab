"""``serve --sandbox``: the daemon with an in-process AOTsend sandbox as its API.

The sandbox (sandbox.py) starts on a loopback port before the rest; every config
the daemon takes is pointed at it (``api.url``, and a fixed key when the config
has none), and a newcomer is told on stdout where to send and where to look.
"""

from __future__ import annotations

import logging

from pydantic import SecretStr

from .admin import format_address
from .config import Config
from .logs import log_event
from .sandbox import Sandbox

__all__ = ["SANDBOX_APP_KEY", "greet", "start_sandbox", "with_sandbox"]

log = logging.getLogger("smtp_bridge.service")

#: The key ``serve --sandbox`` uses when the config has none.
SANDBOX_APP_KEY = "sandbox-key"


async def start_sandbox() -> Sandbox:
    """The sandbox, listening on an ephemeral loopback port."""
    sandbox = Sandbox()
    url = await sandbox.start("127.0.0.1", 0)
    log_event(log, "sandbox_started", url=url)
    return sandbox


def with_sandbox(config: Config, sandbox: Sandbox) -> Config:
    """``config`` with ``api.url`` pointed at ``sandbox``."""
    update: dict[str, object] = {"url": sandbox.url}
    if config.api.app_key is None:
        update["app_key"] = SecretStr(SANDBOX_APP_KEY)
    return config.model_copy(update={"api": config.api.model_copy(update=update)})


def greet(addresses: list[tuple[str, int]], admin_address: str | None) -> None:
    """Tell a newcomer, on stdout, where to send mail and where the console is."""
    smtp = ", ".join(format_address(address) for address in addresses)
    lines = [f"smtp-bridge sandbox: send mail to {smtp or '(no listener)'}"]
    if admin_address is not None:
        url = f"http://{admin_address}/"
        lines.append(f"smtp-bridge console: {url}  (the sandbox outbox: {url}sandbox)")
        log_event(log, "console_url", url=url)
    print("\n".join(lines), flush=True)
