"""The admin endpoint: /healthz, /readyz and /metrics of a real bridge.

The bridge runs in-process against the sandbox with ``admin.listen:
127.0.0.1:0``; mail goes in over SMTP, the endpoint is read over HTTP.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from conftest import DEFAULT_ROUTES, RunningBridge, make_config
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from smtp_bridge.sandbox import Sandbox
from smtp_bridge.service import BridgeService, StartupError

WAIT = 20.0

ADMIN = """
admin:
  listen: "127.0.0.1:0"
"""

ROUTES = (
    ADMIN
    + """
routes:
  - name: shop
    match: {rcpt: "*@example.org"}
    template_id: "E_SHOP"
    data: {subject: "{{ subject }}"}
"""
)

MESSAGE = "From: shop@example.com\r\nSubject: Order\r\n\r\nThanks.\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient, address: str) -> Samples:
    response = await http.get(f"http://{address}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as client:
        yield client


def admin_of(b: RunningBridge) -> str:
    address = b.service.admin_address
    assert address is not None
    return address


async def send(b: RunningBridge, rcpts: list[str]) -> tuple[int, str]:
    """The DATA reply, whatever it is."""
    try:
        return await b.send(MESSAGE, rcpts)
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message


async def rcpt_refused(b: RunningBridge, rcpt: str) -> int:
    async with b.client() as smtp:
        await smtp.ehlo()
        await smtp.mail("app@example.com")
        code, _ = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode())
        return code


# ---------------------------------------------------------------- health


async def test_healthz_and_readyz(bridge: Any, http: httpx.AsyncClient, log_lines: Any) -> None:
    async with bridge(ADMIN + DEFAULT_ROUTES) as b:
        address = admin_of(b)
        assert not address.endswith(":0")
        [logged] = [line for line in log_lines() if line["event"] == "admin_listening"]
        assert logged["address"] == address

        health = await http.get(f"http://{address}/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")

        ready = await http.get(f"http://{address}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "ready": True,
            "failed": [],
            "warnings": [],
            "checks": {"listening": "ok", "store": "ok", "connections": "ok", "breaker": "ok"},
        }
        assert (await http.get(f"http://{address}/nope")).status_code == 404


async def test_readyz_503_when_the_store_is_unwritable(
    bridge: Any, http: httpx.AsyncClient
) -> None:
    async with bridge(ADMIN + DEFAULT_ROUTES) as b:
        store = b.service.store
        assert store is not None
        await store.close()  # what a failed disk looks like to the bridge: writes fail
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["ready"] is False
        assert body["failed"] == ["store"]
        assert body["checks"]["store"] == "not writable"
        # Alive all the same: /healthz is about the process, not its dependencies.
        assert (await http.get(f"http://{admin_of(b)}/healthz")).status_code == 200


async def test_readyz_503_while_shutting_down(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge(ADMIN + DEFAULT_ROUTES) as b:
        b.service.stop()  # SIGTERM received: take it out of the load balancer first
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["listening"] == "shutting down"


@pytest.mark.skipif(
    not hasattr(BridgeService, "breaker_is_open"), reason="the circuit breaker (issue 4) is not in"
)
async def test_readyz_503_while_the_breaker_is_open(
    bridge: Any, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    async with bridge(ROUTES) as b:
        sandbox.script({"code": 40007})  # balance exhausted: opens the breaker
        code, text = await send(b, ["bob@example.org"])
        assert (code, text[:5]) == (451, "4.3.2"), text
        ready = await http.get(f"http://{admin_of(b)}/readyz")
        assert ready.status_code == 503
        assert ready.json()["failed"] == ["breaker"]
        samples = await scrape(http, admin_of(b))
        assert value(samples, "smtp_bridge_breaker_open") == 1


async def test_admin_port_in_use_is_a_startup_error(tmp_path: Path, sandbox: Sandbox) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = f"127.0.0.1:{blocker.getsockname()[1]}"
        config = make_config(tmp_path, sandbox.url, f"admin: {{listen: '{busy}'}}" + DEFAULT_ROUTES)
        service = BridgeService(config)
        try:
            with pytest.raises(StartupError, match=rf"cannot listen on {busy} \(admin.listen\)"):
                await service.startup()
        finally:
            await service.shutdown()


# ---------------------------------------------------------------- metrics


async def test_metrics_count_deliveries_rejections_and_api_errors(
    bridge: Any, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    async with bridge(ROUTES) as b:
        sandbox.script(
            {"to": "bad@example.org", "code": 40005},  # recipient rejected by the provider
            {"to": "err@example.org", "code": 40003},  # template id wrong: configuration
        )
        assert (await send(b, ["ok@example.org"]))[0] == 250
        assert (await send(b, ["bad@example.org"]))[0] == 550
        assert (await send(b, ["err@example.org"]))[0] == 451
        assert await rcpt_refused(b, "nobody@elsewhere.example") == 550  # no route

        samples = await scrape(http, admin_of(b))

    def metric(name: str, **labels: str) -> float:
        return value(samples, name, **labels)

    assert metric("smtp_bridge_messages_total", route="shop", outcome="delivered") == 1
    assert metric("smtp_bridge_messages_total", route="shop", outcome="failed") == 1
    assert metric("smtp_bridge_messages_total", route="shop", outcome="retrying") == 1
    assert metric("smtp_bridge_api_calls_total", code="200") == 1
    assert metric("smtp_bridge_api_calls_total", code="40005") == 1
    assert metric("smtp_bridge_api_calls_total", code="40003") == 1
    assert metric("smtp_bridge_data_replies_total", code="250") == 1
    assert metric("smtp_bridge_data_replies_total", code="550") == 1
    assert metric("smtp_bridge_data_replies_total", code="451") == 1
    assert metric("smtp_bridge_rcpt_rejected_total", reason="no_route") == 1
    assert metric("smtp_bridge_api_latency_seconds_count") == 3
    assert metric("smtp_bridge_sessions_total", result="accepted") == 4
    assert metric("smtp_bridge_breaker_open") == 0
    assert metric("smtp_bridge_config_last_reload_successful") == 1
    assert ("smtp_bridge_build_info", frozenset({("version", _version())})) in samples


async def test_metrics_dead_letters_and_queue_from_the_store(
    bridge: Any, sandbox: Sandbox, http: httpx.AsyncClient
) -> None:
    from smtp_bridge.outcomes import RecipientState
    from smtp_bridge.store import MessageRecord, RecipientRecord

    async with bridge(ROUTES) as b:
        # One recipient delivered, one refused for good: 250, and a dead letter.
        sandbox.script({"to": "bad@example.org", "code": 40005})
        code, text = await send(b, ["ok@example.org", "bad@example.org"])
        assert code == 250, text
        # A spooled recipient, as queue mode writes it (mode is issue 4's).
        store = b.service.store
        assert store is not None
        now = __import__("time").time()
        await store.add_message(
            MessageRecord("Q1", "key-1", "a@example.com", "127.0.0.1", "", "s", 10, now - 60,
                          "queue", content=b"Subject: s\r\n\r\nx\r\n"),
            [RecipientRecord("Q1", "later@example.org", RecipientState.RETRYING,
                             next_attempt=now + 30, spooled_at=now - 60)],
        )  # fmt: skip
        samples = await scrape(http, admin_of(b))
    assert value(samples, "smtp_bridge_dead_letters") == 1
    assert value(samples, "smtp_bridge_queue_depth") == 1
    assert 60 <= value(samples, "smtp_bridge_queue_oldest_age_seconds") < 60 + WAIT


async def test_openmetrics_on_request(bridge: Any, http: httpx.AsyncClient) -> None:
    async with bridge(ADMIN + DEFAULT_ROUTES) as b:
        response = await http.get(
            f"http://{admin_of(b)}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def _version() -> str:
    from smtp_bridge import __version__

    return __version__
