"""Config reload (SIGHUP): validated whole, refused when bad, new sessions only.

In-process tests run :class:`BridgeService` on this test's loop with a config
file and call ``reload()`` (what the SIGHUP handler runs); the last test sends
real SIGHUPs to ``smtp-bridge serve``. Waits are on replies, log lines and
notifications, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from aiohttp import web
from test_daemon import WAIT, Daemon, assert_no_traceback, daemon_env, send
from test_systemd import NotifySocket

from smtp_bridge.config import load_config
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService

ROUTES_A = [{"name": "route-a", "match": {"rcpt": "*@a.example"}, "template_id": "T_A"}]
ROUTES_B = [{"name": "route-b", "match": {"rcpt": "*@b.example"}, "template_id": "T_B"}]
MESSAGE = b"From: app@example.com\r\nSubject: Reload\r\n\r\nHello.\r\n"


def write_config(
    path: Path,
    api_url: str,
    *,
    routes: list[dict[str, Any]] = ROUTES_A,
    listen: list[str] | None = None,
    admin: str | None = None,
    api: dict[str, Any] | None = None,
) -> Path:
    """A config file (JSON is YAML) on loopback, ephemeral ports."""
    doc = {
        "smtp": {"listen": listen or ["127.0.0.1:0"], "hostname": "bridge.test",
                 "shutdown_timeout": "5s"},
        "api": {"url": api_url, "app_key": "reload-key", "timeout": "5s", **(api or {})},
        "delivery": {"state_dir": str(path.parent / "state")},
        "admin": {"listen": admin},
        "routes": routes,
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=2))
    return path


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[BridgeService]:
    service = BridgeService(load_config(path), config_path=path)
    await service.startup()
    try:
        yield service
    finally:
        service.stop()
        await service.shutdown()


def smtp(address: tuple[str, int]) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname=address[0], port=address[1], start_tls=False, timeout=WAIT)


async def send_one(address: tuple[str, int], rcpt: str) -> tuple[int, str]:
    """One transaction on a new connection: the RCPT reply if refused, else DATA's."""
    async with smtp(address) as client:
        await client.ehlo()
        await client.mail("app@example.com")
        try:
            await client.rcpt(rcpt)
            return await client.data(MESSAGE)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message


def reloads(service: BridgeService, result: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "smtp_bridge_config_reloads_total", {"result": result}
    )
    return value or 0.0


# ---------------------------------------------------------------- config


async def test_session_in_progress_finishes_on_the_old_config(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url)
    async with running(path) as service:
        address = service.listeners.addresses[0]
        async with smtp(address) as old_session:
            await old_session.ehlo()
            await old_session.mail("app@example.com")
            assert (await old_session.rcpt("x@a.example"))[0] == 250

            write_config(path, sandbox.url, routes=ROUTES_B)
            assert await service.reload() is True

            # A new session sees only the new routes ...
            assert (await send_one(address, "y@a.example"))[0] == 550
            code, text = await send_one(address, "y@b.example")
            assert code == 250, text
            # ... while the one in progress finishes on the routes it started with.
            code, text = await old_session.data(MESSAGE)
            assert code == 250, text
    sent = {(r["to"], r["template_id"]) for r in sandbox.sent()}
    assert sent == {("x@a.example", "T_A"), ("y@b.example", "T_B")}


async def test_bad_config_is_refused_and_the_old_one_kept(
    tmp_path: Path, sandbox: Sandbox, log_lines: Any
) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url)
    async with running(path) as service:
        address = service.listeners.addresses[0]
        good = path.read_text()
        path.write_text(good.replace('"template_id"', '"template_idd"'))
        assert await service.reload() is False
        [refused] = [line for line in log_lines() if line["event"] == "reload_refused"]
        assert refused["level"] == "error"
        assert any("routes[0].template_idd: unknown key" in e for e in refused["errors"]), refused
        assert (reloads(service, "refused"), reloads(service, "ok")) == (1, 0)
        assert service.metrics.config_last_reload_ok._value.get() == 0
        code, text = await send_one(address, "x@a.example")
        assert code == 250, text

        write_config(path, sandbox.url, routes=ROUTES_B)
        assert await service.reload() is True
        assert (reloads(service, "refused"), reloads(service, "ok")) == (1, 1)
        assert service.metrics.config_last_reload_ok._value.get() == 1
        assert (await send_one(address, "x@a.example"))[0] == 550
        assert (await send_one(address, "x@b.example"))[0] == 250


async def test_sighup_during_startup_reloads_once_ready(tmp_path: Path, sandbox: Sandbox) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url)
    service = BridgeService(load_config(path), config_path=path)
    write_config(path, sandbox.url, routes=ROUTES_B)  # changed while starting
    service._on_sighup()  # what the handler does when SIGHUP comes before READY=1
    await service.startup()
    try:
        await asyncio.wait_for(asyncio.gather(*service._tasks), WAIT)
        assert reloads(service, "ok") == 1
        assert (await send_one(service.listeners.addresses[0], "x@b.example"))[0] == 250
    finally:
        service.stop()
        await service.shutdown()


# ---------------------------------------------------------------- listeners


async def test_listeners_change_only_when_the_addresses_change(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    first, second = "127.0.0.1:0", "127.0.0.2:0"  # both loopback (127.0.0.0/8)
    path = write_config(tmp_path / "config.yaml", sandbox.url, listen=[first])
    async with running(path) as service:
        [kept] = service.listeners.addresses
        async with smtp(kept) as session:  # a session on the listener that goes away later
            await session.ehlo()

            # Same addresses, other routes: the very same listener stays.
            write_config(path, sandbox.url, listen=[first], routes=ROUTES_A + ROUTES_B)
            assert await service.reload() is True
            assert service.listeners.addresses == [kept]

            # One added: opened; the unchanged one keeps its (ephemeral) port.
            write_config(path, sandbox.url, listen=[first, second])
            assert await service.reload() is True
            assert service.listeners.addresses[0] == kept
            [added] = service.listeners.addresses[1:]
            assert added[0] == "127.0.0.2"
            assert (await send_one(added, "x@a.example"))[0] == 250
            assert (await send_one(kept, "x@a.example"))[0] == 250

            # One removed: closed for new connections ...
            write_config(path, sandbox.url, listen=[second])
            assert await service.reload() is True
            assert service.listeners.addresses == [added]
            with pytest.raises(OSError):
                await asyncio.open_connection(*kept)
            # ... while the session it accepted carries on.
            await session.mail("app@example.com")
            assert (await session.rcpt("z@a.example"))[0] == 250
            code, text = await session.data(MESSAGE)
            assert code == 250, text


async def test_listen_address_that_cannot_be_bound_refuses_the_reload(
    tmp_path: Path, sandbox: Sandbox, log_lines: Any
) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url)
    async with running(path) as service:
        before = list(service.listeners.addresses)
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            busy = f"127.0.0.1:{blocker.getsockname()[1]}"
            write_config(path, sandbox.url, listen=["127.0.0.1:0", busy], routes=ROUTES_B)
            assert await service.reload() is False
        [refused] = [line for line in log_lines() if line["event"] == "reload_refused"]
        assert refused["errors"] == [f"cannot listen on {busy}: Address already in use"]
        # Nothing of the refused config was applied: not the routes either.
        assert service.listeners.addresses == before
        assert (await send_one(before[0], "x@a.example"))[0] == 250


async def test_admin_listener_follows_admin_listen(tmp_path: Path, sandbox: Sandbox) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url)
    async with running(path) as service, httpx.AsyncClient(timeout=WAIT, trust_env=False) as http:
        assert service.admin_address is None
        write_config(path, sandbox.url, admin="127.0.0.1:0")
        assert await service.reload() is True
        address = service.admin_address
        assert address is not None
        assert (await http.get(f"http://{address}/healthz")).status_code == 200
        write_config(path, sandbox.url, admin=None)
        assert await service.reload() is True
        assert service.admin_address is None
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://{address}/healthz")


# ---------------------------------------------------------------- API client


class GatedApi:
    """An AOTsend stand-in that holds every answer until :meth:`release`."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _send(self, request: web.Request) -> web.Response:
        await request.read()
        self.arrived.set()
        await self._release.wait()
        return web.json_response({"code": 200, "message": "Request successful"})

    def release(self) -> None:
        self._release.set()

    async def __aenter__(self) -> GatedApi:
        app = web.Application()
        app.router.add_post("/index/api/send_email", self._send)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/index/api/send_email"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        assert self._runner is not None
        await self._runner.cleanup()


async def test_api_client_rebuilt_only_when_its_settings_change(
    tmp_path: Path, sandbox: Sandbox, log_lines: Any
) -> None:
    async with GatedApi() as gated:
        path = write_config(tmp_path / "config.yaml", gated.url)
        async with running(path) as service:
            address = service.listeners.addresses[0]
            original = service.api
            assert original is not None

            # Routes only: the client (and its connection pool) is kept.
            write_config(path, gated.url, routes=ROUTES_A + ROUTES_B)
            assert await service.reload() is True
            assert service.api is original

            # A call in flight on the old client when the URL changes ...
            in_flight = asyncio.ensure_future(send_one(address, "x@a.example"))
            await asyncio.wait_for(gated.arrived.wait(), WAIT)
            write_config(path, sandbox.url, api={"timeout": "4s"})
            assert await service.reload() is True
            assert service.api is not original
            assert original.in_flight == 1
            # ... new calls go out on the new client ...
            code, text = await send_one(address, "y@a.example")
            assert code == 250, text
            assert [r["to"] for r in sandbox.sent()] == ["y@a.example"]
            # ... and the old one finishes its call, then is closed.
            gated.release()
            code, text = await asyncio.wait_for(in_flight, WAIT)
            assert code == 250, text
            await asyncio.wait_for(asyncio.gather(*service._tasks), WAIT)
            assert original.in_flight == 0
            assert original._client.is_closed
    reloaded = [line for line in log_lines() if line["event"] == "reloaded"]
    assert [line["api_client"] for line in reloaded] == ["kept", "rebuilt"]


# ---------------------------------------------------------------- the real daemon


async def test_sighup_refuses_a_broken_config_and_takes_a_fixed_one(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    path = write_config(tmp_path / "config.yaml", sandbox.url, admin="127.0.0.1:0")
    notify = NotifySocket()
    daemon = await Daemon.start(
        "serve", "--config", str(path), env=daemon_env(NOTIFY_SOCKET=notify.path)
    )
    try:
        port = await daemon.port()
        _, admin = await daemon.wait_event("admin_listening")
        ready, _ = await notify.wait("READY")

        good = path.read_text()
        path.write_text(good.replace('"template_id"', '"template_idd"'))
        daemon.proc.send_signal(signal.SIGHUP)
        reloading, _ = await notify.wait("RELOADING", after=ready + 1)
        ready, _ = await notify.wait("READY", after=reloading + 1)
        refused_at, _ = await daemon.wait_event("reload_refused")
        assert (await send(port, "x@a.example"))[0] == 250  # the old routes
        assert (await send(port, "x@b.example"))[0] == 550

        write_config(path, sandbox.url, admin="127.0.0.1:0", routes=ROUTES_B)
        daemon.proc.send_signal(signal.SIGHUP)
        reloading, _ = await notify.wait("RELOADING", after=ready + 1)
        await notify.wait("READY", after=reloading + 1)
        await daemon.wait_event("reloaded", after=refused_at)
        assert (await send(port, "x@b.example"))[0] == 250  # the new routes
        assert (await send(port, "x@a.example"))[0] == 550

        async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as http:
            metrics = (await http.get(f"http://{admin['address']}/metrics")).text
        assert 'smtp_bridge_config_reloads_total{result="refused"} 1.0' in metrics
        assert 'smtp_bridge_config_reloads_total{result="ok"} 1.0' in metrics
        assert "smtp_bridge_config_last_reload_successful 1.0" in metrics
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
        notify.close()
    assert_no_traceback(daemon.stderr)
