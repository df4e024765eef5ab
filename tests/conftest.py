"""Shared fixtures: the real bridge on an ephemeral loopback port, the sandbox API.

``bridge(...)`` builds the config from YAML text through the real loader, starts
:class:`BridgeService` on this test's event loop and stops it afterwards, so
tests drive it with real SMTP clients (aiosmtplib here; smtplib in a thread).
"""

from __future__ import annotations

import io
import json
import logging
import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from smtp_bridge.config import Config, parse_config
from smtp_bridge.logs import LOGGER, JsonFormatter
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService

# PostgreSQL fixtures (pg_cluster, pg_url): tests/pg.py.
pytest_plugins = ["pg"]

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
    text = make_config_text(tmp_path, api_url, body)
    return parse_config(text, filename="test-config.yaml", env=env)


def make_config_text(tmp_path: Path, api_url: str, body: str = DEFAULT_ROUTES) -> str:
    """The text :func:`make_config` parses (JSON, which is YAML)."""
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
    return json.dumps(base)


class RunningBridge:
    """A started BridgeService plus helpers to talk to it."""

    def __init__(self, service: BridgeService, sandbox: Sandbox) -> None:
        self.service = service
        self.sandbox = sandbox
        self.host, self.port = service.listeners.addresses[0]

    def client(self, **kwargs: Any) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False, **kwargs)

    @property
    def tls_port(self) -> int:
        """The first implicit TLS listener's port (``smtp.tls.implicit_listen``)."""
        return self.service.listeners.implicit_tls_addresses[0][1]

    def tls_client(self, context: ssl.SSLContext, **kwargs: Any) -> aiosmtplib.SMTP:
        """A client of the implicit TLS listener."""
        return aiosmtplib.SMTP(
            hostname=self.host, port=self.tls_port, use_tls=True, tls_context=context, **kwargs
        )

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


@dataclass
class TlsFiles:
    """A certificate and key made by ``trustme``, and the CA clients trust."""

    ca: trustme.CA
    cert: Path
    key: Path

    @classmethod
    def issue(cls, directory: Path, ca: trustme.CA | None = None) -> TlsFiles:
        """Write a certificate for bridge.test, 127.0.0.1 and ::1 into ``directory``."""
        ca = ca or trustme.CA()
        issued = ca.issue_cert("bridge.test", "127.0.0.1", "::1")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "tls.crt", directory / "tls.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        return cls(ca, cert, key)

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only and verifies the host name."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def yaml(self, *, starttls: bool = True, implicit: bool = False) -> str:
        """The ``tls:`` mapping (YAML flow style) for ``smtp:``."""
        listen = '["127.0.0.1:0"]' if implicit else "[]"
        return (
            f'{{cert: "{self.cert}", key: "{self.key}", '
            f"starttls: {str(starttls).lower()}, implicit_listen: {listen}}}"
        )


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    """A server certificate from a fresh ``trustme`` CA, under ``tmp_path/tls``."""
    return TlsFiles.issue(tmp_path / "tls")


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as api:
        yield api


BridgeFactory = Callable[..., Any]


def run_on_uvloop(case: Callable[..., Any], tmp_path: Path, **kwargs: Any) -> None:
    """Run the async test ``case`` on uvloop (the daemon's loop, whose transports
    are not asyncio's own), with a ``bridge`` factory like the fixture's."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with Sandbox() as sandbox:

            @asynccontextmanager
            async def run(
                body: str = DEFAULT_ROUTES, *, api_url: str | None = None
            ) -> AsyncIterator[RunningBridge]:
                service = BridgeService(make_config(tmp_path, api_url or sandbox.url, body))
                await service.startup()
                try:
                    yield RunningBridge(service, sandbox)
                finally:
                    service.stop()
                    await service.shutdown()

            await case(run, **kwargs)

    uvloop.run(main())


@pytest.fixture
def bridge(tmp_path: Path, sandbox: Sandbox) -> BridgeFactory:
    """``async with bridge(yaml_text) as b:`` runs a bridge against ``sandbox``."""

    @asynccontextmanager
    async def run(
        body: str = DEFAULT_ROUTES,
        *,
        api_url: str | None = None,
        config_file: Path | None = None,
        **env: str,
    ) -> AsyncIterator[RunningBridge]:
        """``config_file``: also write the config there, so ``service.reload()`` works."""
        config = make_config(tmp_path, api_url or sandbox.url, body, **env)
        if config_file is not None:
            config_file.write_text(make_config_text(tmp_path, api_url or sandbox.url, body))
        service = BridgeService(config, config_path=config_file)
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
