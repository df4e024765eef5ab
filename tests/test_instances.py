"""Several instances on one PostgreSQL store behave as one bridge.

Real daemons (in-process services, and ``smtp-bridge serve`` processes where one
must be killed) on one throwaway PostgreSQL database (tests/pg.py), real SMTP,
the sandbox as the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from test_daemon import Daemon
from test_once import A, B, make_message, send, spool_drained, text_of

from smtp_bridge import replies
from smtp_bridge.daemon_admin import Readiness
from smtp_bridge.sandbox import Sandbox

#: Upper bound of any one wait; never a synchronisation sleep.
WAIT = 30.0
ROUTES = """
routes:
  - name: default
    template_id: "E_GENERIC"
    data: {subject: "{{ subject }}"}
"""


#: A breaker held row waits ``breaker_interval`` on every instance (the API is
#: shared, so one instance's evidence that it is down counts for all); kept short
#: so a test whose API was down does not wait the default 30 s after it is back.
BREAKER = "api: {breaker_interval: 100ms}\n"


def shared(url: str, mode: str = "direct", extra: str = "") -> str:
    return f"delivery: {{mode: {mode}, store: {json.dumps(url)}{extra}}}\n" + BREAKER + ROUTES


async def shared_spool_empty(b: Any) -> None:
    """Wait until the shared spool is empty, whichever instance's workers empty it.

    Looks again after each attempt this instance finishes, or every 0.1 s for the
    other's (a bounded wait for a condition, not a sleep standing in for one).
    """
    worker = b.service.worker
    async with asyncio.timeout(WAIT):
        while True:
            done = worker.attempts_done  # before the look (see test_once.spool_drained)
            if not (await b.service.store.spool_stats()).depth:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.wait_attempts(done + 1), 0.1)


def calls(sandbox: Sandbox, code: int | None = None) -> Counter[str]:
    return Counter(r["to"] for r in sandbox.sent() if code is None or r["code"] == code)


async def test_client_retry_through_another_instance_skips_the_delivered(
    bridge: Any, sandbox: Sandbox, pg_url: str
) -> None:
    message = make_message("<via-two@app>")
    async with bridge(shared(pg_url)) as first, bridge(shared(pg_url)) as second:
        sandbox.script({"status": 503, "to": B})
        code, text = await send(first, message, [A, B])
        assert code == 451, text
        code, text = await send(second, message, [A, B])  # the balancer chose the other
        assert code == 250, text
        code, text = await send(first, message, [A, B])  # and once more, back on the first
        assert code == 250 and text.startswith(text_of(replies.ALREADY_DELIVERED)), text
    assert calls(sandbox, 200) == {A: 1, B: 1}


@pytest.mark.parametrize("mode", ["direct", "hybrid", "queue"])
async def test_the_same_message_to_two_instances_at_once_is_sent_once(
    bridge: Any, pg_url: str, mode: str
) -> None:
    message = make_message(f"<raced-{mode}@app>")
    async with (
        Sandbox(latency=0.2) as slow,
        bridge(shared(pg_url, mode), api_url=slow.url) as first,
        bridge(shared(pg_url, mode), api_url=slow.url) as second,
    ):
        results = await asyncio.gather(
            *(send(b, message, [A, B]) for b in (first, second, first, second))
        )
        assert [code for code, _ in results] == [250] * 4, results
        if mode != "direct":
            await shared_spool_empty(first)
    assert calls(slow) == {A: 1, B: 1}


async def test_spooled_by_one_instance_delivered_by_any_and_seen_by_every_cli(
    bridge: Any, sandbox: Sandbox, pg_url: str, tmp_path: Path
) -> None:
    async with bridge(shared(pg_url, "queue", ", backoff: [50ms]")) as first:
        sandbox.script({"status": 503, "times": 1000})  # the API is down: it all waits
        for n in range(3):
            assert (await send(first, make_message(f"<spool-{n}@app>"), [A]))[0] == 250
        listed = await (await cli_queue(tmp_path, pg_url, "list", "--json"))
        assert len(json.loads(listed)) == 3  # the other instance's CLI sees the spool
    sandbox.clear_script()  # the API is back; the first instance is gone
    async with bridge(shared(pg_url, "queue", ", backoff: [50ms]")) as second:
        await spool_drained(second)
    assert calls(sandbox, 200) == {A: 3}


async def cli_queue(tmp_path: Path, url: str, *args: str) -> asyncio.Future[str]:
    """``smtp-bridge queue`` on a config of its own naming the shared store."""
    config = tmp_path / "cli.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            api: {{url: "http://127.0.0.1:9/", app_key: k}}
            delivery: {{store: {json.dumps(url)}}}
            admin: {{listen: null}}
            """)
        + ROUTES
    )
    process = await asyncio.create_subprocess_exec(
        *_bridge(), "queue", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    async def output() -> str:
        out, err = await asyncio.wait_for(process.communicate(), WAIT)
        assert process.returncode == 0, err.decode()
        return out.decode()

    return asyncio.ensure_future(output())


def _bridge() -> list[str]:
    from test_daemon import bridge_command

    return bridge_command()


def daemon_config(path: Path, url: str, api_url: str, mode: str = "queue") -> Path:
    path.write_text(
        textwrap.dedent(f"""\
            smtp: {{listen: ["127.0.0.1:0"], hostname: bridge.test}}
            api: {{url: {json.dumps(api_url)}, app_key: k, timeout: 5s, breaker_interval: 100ms}}
            delivery:
              mode: {mode}
              store: {json.dumps(url)}
              backoff: [50ms]
              claim_lease: 2s
              in_flow_delay: 0
            admin: {{listen: null}}
            """)
        + ROUTES
    )
    return path


async def test_kill_9_of_one_instance_the_other_delivers_its_spool_once(
    tmp_path: Path, pg_url: str
) -> None:
    async with Sandbox() as api:
        api.script({"status": 503, "times": 100_000})  # nothing leaves while A spools
        first = await Daemon.start(
            "serve", "--config", str(daemon_config(tmp_path / "a.yaml", pg_url, api.url))
        )
        second: Daemon | None = None
        try:
            port = await first.port()
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=WAIT) as smtp:
                for n in range(10):
                    await smtp.sendmail(
                        "app@example.com", [f"r{n}@example.org"], make_message(f"<k{n}@app>")
                    )
            await api.wait_sent(1)  # A's workers are at it
            first.proc.send_signal(signal.SIGKILL)
            await first.wait()
            api.clear_script()  # the API recovers; only B is left to deliver
            second = await Daemon.start(
                "serve", "--config", str(daemon_config(tmp_path / "b.yaml", pg_url, api.url))
            )
            await second.port()
            async with asyncio.timeout(WAIT):
                while len([r for r in api.sent() if r["code"] == 200]) < 10:
                    await api.wait_sent(len(api.sent()) + 1)
        finally:
            for daemon in (first, second):
                if daemon is not None and daemon.proc.returncode is None:
                    daemon.proc.send_signal(signal.SIGTERM)
                    await daemon.wait()
    delivered = Counter(r["to"] for r in api.sent() if r["code"] == 200)
    assert delivered == {f"r{n}@example.org": 1 for n in range(10)}


async def test_database_stopped_under_load_never_250_without_commit(
    bridge: Any, sandbox: Sandbox, pg_cluster: Any, pg_url: str
) -> None:
    # An attempt the outage cuts keeps its claim until the lease runs out (the
    # recipient then comes back, spool_attempt.py): a 2 s lease, not the default
    # 60 s, so that the drain below never depends on when the database stopped.
    delivery = ", backoff: [50ms], claim_lease: 2s"
    async with bridge(shared(pg_url, "queue", delivery)) as b:
        before = [await send(b, make_message(f"<up-{n}@app>"), [A]) for n in range(3)]
        pg_cluster.stop()
        try:
            down = [await send(b, make_message(f"<down-{n}@app>"), [A]) for n in range(3)]
            unready = await Readiness(b.service).store()  # /readyz's store check
        finally:
            pg_cluster.start()
        after = [await send(b, make_message(f"<back-{n}@app>"), [A]) for n in range(3)]
        await spool_drained(b)
    assert [code for code, _ in before] == [250] * 3
    assert [code for code, _ in down] == [451] * 3, down
    assert all(text.startswith("4.3.0") for _, text in down), down
    assert [code for code, _ in after] == [250] * 3, after
    assert unready is not None
    # Every 250 was a commit: all six delivered, none of the refused ones.
    subjects = Counter(r["to"] for r in sandbox.sent() if r["code"] == 200)
    assert subjects == {A: 6}


async def test_instances_starting_together_on_an_empty_database_all_come_up(
    tmp_path: Path, pg_url: str
) -> None:
    async with Sandbox() as api:
        daemons = await asyncio.gather(
            *(
                Daemon.start(
                    "serve", "--config", str(daemon_config(tmp_path / f"{n}.yaml", pg_url, api.url))
                )
                for n in range(3)
            )
        )
        try:
            ports = await asyncio.gather(*(d.port() for d in daemons))
            assert len(set(ports)) == 3
        finally:
            for daemon in daemons:
                daemon.proc.send_signal(signal.SIGTERM)
            codes = [await d.wait() for d in daemons]
    assert codes == [0, 0, 0]


async def test_unreachable_database_at_start_exits_non_zero_naming_the_store(
    tmp_path: Path,
) -> None:
    url = "postgresql://bridge:s3cretpw@127.0.0.1:9/nowhere"  # discard port: refused
    async with Sandbox() as api:
        daemon = await Daemon.start(
            "serve", "--config", str(daemon_config(tmp_path / "x.yaml", url, api.url))
        )
        code = await daemon.wait()
    assert code != 0
    assert "postgresql://bridge@127.0.0.1:9/nowhere" in daemon.stderr
    assert "s3cretpw" not in daemon.stderr


async def test_the_store_password_never_reaches_a_log_line(
    bridge: Any, pg_cluster: Any, pg_url: str, log_lines: Any
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    url = pg_cluster.url(database, password="s3cretpw")  # trust auth: sent, ignored
    async with bridge(shared(url)) as b:
        from smtp_bridge.logs import log_event

        code, _ = await send(b, make_message("<pw@app>"), [A])
        # Even a line that quotes the URL by mistake has its password scrubbed.
        log_event(logging.getLogger("smtp_bridge.test"), "oops", store=url)
    assert code == 250
    text = log_lines.text()
    assert "s3cretpw" not in text
    assert "oops" in text
