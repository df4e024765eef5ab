"""A 250 survives the process: ``kill -9`` under load, SIGTERM, a dead owner's claims.

The daemon runs as ``smtp-bridge serve`` subprocesses. For the crash the API
is a separate ``smtp-bridge sandbox`` process too, so what it received
survives the kill and is counted over HTTP (``/_sent``, ``/_wait``); waits
are on log lines and on the sandbox's request count, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import textwrap
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from test_daemon import Daemon, make_message, run_command
from test_queue import ROUTES

from smtp_bridge.outcomes import RecipientState
from smtp_bridge.sandbox import Sandbox
from smtp_bridge.store import STATE_FILE, MessageRecord, RecipientRecord
from smtp_bridge.store.sqlite import SQLiteStore as Store

#: Upper bound of any one wait; never a synchronisation sleep.
WAIT = 30.0
CLIENTS = 8
MESSAGES = 400
#: Worker calls in flight at most (api.max_concurrency): the bound on duplicates.
CONCURRENCY = 16


def queue_config(
    path: Path, state_dir: Path, api_url: str, *, concurrency: int, grace: str = "5s"
) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
            smtp:
              listen: ["127.0.0.1:0"]
              hostname: bridge.test
              shutdown_timeout: {grace}
              max_connections_per_ip: 100
            api:
              url: {json.dumps(api_url)}
              app_key: crash-test-key
              timeout: 5s
              max_concurrency: {concurrency}
            delivery:
              mode: queue
              state_dir: {json.dumps(str(state_dir))}
              backoff: [50ms]
              # These tests need the spool to run ahead of the workers.
              in_flow_delay: 0
            admin:
              listen: null
            """)
        + ROUTES
    )
    return path


async def start_sandbox(*args: str) -> tuple[Daemon, str]:
    """``smtp-bridge sandbox`` as a process; its send_email URL, from its log."""
    process = await Daemon.start("sandbox", "--listen", "127.0.0.1:0", *args)
    async with asyncio.timeout(WAIT):
        while True:
            for event in process.events:
                found = re.match(r"sandbox listening on (\S+)", event.get("event", ""))
                if found:
                    return process, found.group(1)
            process._changed.clear()
            await process._changed.wait()


async def sent(base: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(f"{base}/_sent")
        records: list[dict[str, Any]] = response.json()
    return records


async def script(base: str, entry: dict[str, Any] | None) -> None:
    """Queue one fault in the sandbox (``/_script``), or clear them all (None)."""
    async with httpx.AsyncClient(timeout=WAIT) as client:
        if entry is None:
            response = await client.delete(f"{base}/_script")
        else:
            response = await client.post(f"{base}/_script", json=entry)
        response.raise_for_status()


async def wait_received(base: str, count: int) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        await client.get(f"{base}/_wait", params={"received": count, "timeout": 5})


async def client(port: int, number: int, accepted: list[str], kill: asyncio.Event) -> None:
    """Send this client's share of the messages on one connection until the daemon dies."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=WAIT)
    try:
        await smtp.connect()
        await smtp.ehlo()
        for i in range(MESSAGES // CLIENTS):
            rcpt = f"c{number}-m{i}@example.org"
            await smtp.mail("app@example.com")
            await smtp.rcpt(rcpt)
            response = await smtp.data(make_message(f"crash {number}/{i}"))
            if response.code == 250:
                accepted.append(rcpt)
            if len(accepted) >= MESSAGES * 3 // 8:
                kill.set()
    except (aiosmtplib.SMTPException, OSError):
        return  # the daemon was killed: whatever got no 250 is the client's to retry
    finally:
        smtp.close()


async def test_kill_9_under_load_loses_no_accepted_message(tmp_path: Path) -> None:
    sandbox, api_url = await start_sandbox("--latency", "0.05")
    base = api_url.split("/index/", 1)[0]
    config = queue_config(
        tmp_path / "config.yaml", tmp_path / "state", api_url, concurrency=CONCURRENCY
    )
    # The first message's recipient is refused (503) until the restart: work is
    # in the spool at the kill whatever pace the workers kept.
    held = "c0-m0@example.org"
    await script(base, {"status": 503, "to": held, "times": 100_000})
    daemon = await Daemon.start("serve", "--config", str(config))
    restarted: Daemon | None = None
    try:
        port = await daemon.port()
        accepted: list[str] = []
        kill = asyncio.Event()
        clients = [asyncio.ensure_future(client(port, n, accepted, kill)) for n in range(CLIENTS)]
        async with asyncio.timeout(WAIT):
            await kill.wait()
        before_kill = len(await sent(base))
        daemon.proc.send_signal(signal.SIGKILL)
        killed_at = datetime.now(UTC)
        assert await daemon.wait() == -signal.SIGKILL
        await asyncio.gather(*clients)
        # Work was still in the spool at the kill: the held recipient, at least.
        assert held in accepted
        assert held not in {r["to"] for r in await sent(base) if r["code"] == 200}
        await script(base, None)  # the API takes it now

        # Calls stamped before this came from the killed process (a request it
        # wrote just before the kill may reach the sandbox just after it), and
        # calls stamped after it from the restarted one: nothing else sends.
        restarted_at = datetime.now(UTC)
        restarted = await Daemon.start("serve", "--config", str(config))
        await restarted.port()  # startup, claims recovery included, is over
        recovered = next(
            (e for e in restarted.events if e.get("event") == "spool_recovered"),
            {"recipients": 0},
        )
        async with asyncio.timeout(WAIT):
            while True:
                records = await sent(base)
                delivered = Counter(r["to"] for r in records if r["code"] == 200)
                if set(accepted) <= set(delivered):
                    break
                await wait_received(base, len(records) + 1)

        lost = set(accepted) - set(delivered)
        duplicates = {to: n for to, n in delivered.items() if n > 1}
        print(
            f"\ncrash test: {len(accepted)} accepted, {len(set(delivered))} delivered "
            f"({sum(delivered.values())} calls), {len(duplicates)} duplicates, "
            f"{before_kill} calls before the kill, {recovered['recipients']} claims recovered"
        )
        assert lost == set()
        # Duplicates only for calls in flight at the kill: at most one per worker
        # slot, each sent once before the kill and once after the restart.
        assert len(duplicates) <= recovered["recipients"] <= CONCURRENCY
        assert set(duplicates.values()) <= {2}
        for to in duplicates:
            times = sorted(datetime.fromisoformat(r["time"]) for r in records if r["to"] == to)
            assert times[0] <= restarted_at <= times[1], (to, times, killed_at, restarted_at)
        assert await restarted.terminate() == 0
    finally:
        for process in (daemon, restarted, sandbox):
            if process is not None:
                await process.close()


async def queue_list(config: Path) -> list[dict[str, Any]]:
    daemon = await Daemon.start("queue", "--config", str(config), "list", "--json")
    try:
        assert await daemon.wait() == 0, daemon.stderr
        assert daemon.proc.stdout is not None
        listed: list[dict[str, Any]] = json.loads(await daemon.proc.stdout.read())
        return listed
    finally:
        await daemon.close()


async def send_all(port: int, subjects: list[str]) -> None:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as smtp:
        for subject in subjects:
            response = await smtp.sendmail(
                "app@example.com", [f"{subject}@example.org"], make_message(subject)
            )
            assert response[1].startswith("2.0.0 Ok, queued"), response


async def test_sigterm_finishes_calls_in_flight_and_leaves_the_rest_spooled(
    tmp_path: Path,
) -> None:
    async with Sandbox(latency=0.3) as api:
        config = queue_config(tmp_path / "config.yaml", tmp_path / "state", api.url, concurrency=2)
        daemon = await Daemon.start("serve", "--config", str(config))
        try:
            port = await daemon.port()
            await send_all(port, [f"t{n}" for n in range(6)])
            await api.wait_sent(2)  # both worker slots busy
            assert await daemon.terminate() == 0
        finally:
            await daemon.close()
        # The two calls in flight were let finish and recorded; nothing else was sent.
        assert sorted((r["to"], r["code"]) for r in api.sent()) == [
            ("t0@example.org", 200),
            ("t1@example.org", 200),
        ]
        listed = await queue_list(config)
        assert sorted(r["rcpt"] for r in listed) == [f"t{n}@example.org" for n in range(2, 6)]
        assert {r["state"] for r in listed} == {"retrying"}

        daemon = await Daemon.start("serve", "--config", str(config))
        try:
            await daemon.port()
            await api.wait_sent(6)
            assert await daemon.terminate() == 0
        finally:
            await daemon.close()
        assert sorted(r["to"] for r in api.sent()) == [f"t{n}@example.org" for n in range(6)]


async def test_sigterm_grace_over_interrupts_a_hanging_call_and_it_is_sent_again(
    tmp_path: Path,
) -> None:
    async with Sandbox() as api:
        config = queue_config(
            tmp_path / "config.yaml", tmp_path / "state", api.url, concurrency=2, grace="300ms"
        )
        api.script({"action": "hang"})
        daemon = await Daemon.start("serve", "--config", str(config))
        try:
            port = await daemon.port()
            await send_all(port, ["hang"])
            await api.wait_sent(1)
            assert await daemon.terminate() == 0
            await daemon.wait_event("worker_interrupted")
        finally:
            await daemon.close()
        [waiting] = await queue_list(config)
        assert (waiting["rcpt"], waiting["state"]) == ("hang@example.org", "unknown")

        daemon = await Daemon.start("serve", "--config", str(config))
        try:
            await daemon.port()
            await api.wait_sent(2)
            assert await daemon.terminate() == 0
            await daemon.wait_event("possible_duplicate")
        finally:
            await daemon.close()
        assert [r["code"] for r in reversed(api.sent())] == [None, 200]


async def test_claims_of_a_dead_claimer_are_released_at_startup(tmp_path: Path) -> None:
    """Claimed by a worker that went away: the next daemon sends it at once, while the
    claims of a claimer still alive (another ``serve --workers`` process) are left alone."""
    path = tmp_path / "state" / STATE_FILE
    gone = await Store.open(path)
    alive = await Store.open(path)
    try:
        assert await gone.recover_claims() == 0
        assert await alive.recover_claims() == 0
        for store, name in ((gone, "orphan"), (alive, "busy")):
            await store.add_message(
                MessageRecord(name, name, "app@example.com", "127.0.0.1", "", name, 1, 1.0,
                              "queue", make_message(name)),
                [RecipientRecord(name, f"{name}@example.org", RecipientState.RETRYING,
                                 next_attempt=1.0, spooled_at=1.0)],
            )  # fmt: skip
            # Leased for a century: only the claimer's death can free it early.
            [_] = await store.claim_due(now=2.0, limit=1, lease=3e9)
        await gone.close()  # its process ends, its lock with it

        async with Sandbox() as api:
            config = queue_config(
                tmp_path / "config.yaml", tmp_path / "state", api.url, concurrency=2
            )
            daemon = await Daemon.start("serve", "--config", str(config))
            try:
                await daemon.port()
                _, recovered = await daemon.wait_event("spool_recovered")
                assert recovered["recipients"] == 1
                await api.wait_sent(1)
                assert await daemon.terminate() == 0
            finally:
                await daemon.close()
            assert [(r["to"], r["code"]) for r in api.sent()] == [("orphan@example.org", 200)]
        found = await alive.get_message("busy")
        assert found is not None and found[1][0].state is RecipientState.RETRYING
    finally:
        await alive.close()
    code, _ = await run_command("queue", "--config", str(config), "list")
    assert code == 0
