"""Shared fixtures: the real bridge on an ephemeral loopback port, the sandbox API.

``bridge(...)`` builds the config from YAML text through the real loader, starts
:class:`BridgeService` on this test's event loop and stops it afterwards, so
tests drive it with real SMTP clients (aiosmtplib here; smtplib in a thread).
"""

from __future__ import annotations

import io
import json
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_bridge.config import Config, parse_config
from smtp_bridge.logs import LOGGER, JsonFormatter
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService

TEST_KEY = "test-key-5ecr3t-0123456789"

DEFAULT_ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}", body: "{{ text }}"}
"""


def make_config(tmp_path: Path, api_url: str, body: str = DEFAULT_ROUTES, **env: str) -> Config:
    """Config from YAML ``body`` (routes etc.) plus test-safe smtp/api/delivery defaults.

    Sections given in ``body`` are merged over the defaults one level deep.
    """
    import yaml

    base: dict[str, Any] = {
        "smtp": {
            "listen": ["127.0.0.1:0"],
            "hostname": "bridge.test",
            "timeout": "30s",
            "shutdown_timeout": "5s",
        },
        "api": {"url": api_url, "app_key": TEST_KEY, "timeout": "5s"},
        "delivery": {"state_dir": str(tmp_path / "state")},
        "admin": {"listen": None},
    }
    extra = yaml.safe_load(textwrap.dedent(body)) or {}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_config(json.dumps(base), filename="test-config.yaml", env=env)


class RunningBridge:
    """A started BridgeService plus helpers to talk to it."""

    def __init__(self, service: BridgeService, sandbox: Sandbox) -> None:
        self.service = service
        self.sandbox = sandbox
        self.host, self.port = service.addresses[0]

    def client(self, **kwargs: Any) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False, **kwargs)

    async def send(
        self, message: bytes | str, rcpts: list[str], mail_from: str = "app@example.com"
    ) -> tuple[int, str]:
        """Send one message on a fresh connection; return the DATA reply (code, text)."""
        if isinstance(message, str):
            message = message.encode()
        async with self.client() as smtp:
            await smtp.ehlo()
            code, _ = await smtp.mail(mail_from)
            assert code == 250
            for rcpt in rcpts:
                code, text = await smtp.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
            code, text = await smtp.data(message)
            return code, text

    def delivered(self, to: str | None = None) -> list[dict[str, Any]]:
        """Requests the sandbox answered with 200, newest first."""
        return [
            r for r in self.sandbox.sent() if r["code"] == 200 and (to is None or r["to"] == to)
        ]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as api:
        yield api


BridgeFactory = Callable[..., Any]


@pytest.fixture
def bridge(tmp_path: Path, sandbox: Sandbox) -> BridgeFactory:
    """``async with bridge(yaml_text) as b:`` runs a bridge against ``sandbox``."""

    @asynccontextmanager
    async def run(
        body: str = DEFAULT_ROUTES, *, api_url: str | None = None, **env: str
    ) -> AsyncIterator[RunningBridge]:
        config = make_config(tmp_path, api_url or sandbox.url, body, **env)
        service = BridgeService(config)
        await service.startup()
        try:
            yield RunningBridge(service, sandbox)
        finally:
            service.stop()
            await service.shutdown()

    return run


@pytest.fixture
def log_lines() -> Any:
    """Capture the bridge's JSON log lines (exactly as journald would get them)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    previous = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in stream.getvalue().splitlines() if line]

    lines.text = stream.getvalue  # type: ignore[attr-defined]
    try:
        yield lines
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(previous)
