"""Once means once, measured (issue 11): load, resends, SIGKILLs, a flaky API, a failing store.

    .venv/bin/python bench/chaos.py --mode all --seconds 60 --kills 3 --seed 1

For ``--seconds`` per mode it runs the real daemon (``bench/chaos_daemon.py``:
``smtp-bridge serve`` whose store fails some commits) on 127.0.0.1, a flaky and
slow sandbox API in this process (so it survives the kills and counts every
call), several SMTP clients that resend some messages (back to back, during the
call, after a cut connection, after a 4xx), and ``--kills`` SIGKILLs of the
daemon at random moments, each followed by a restart on the same state_dir.
Then it drains (stops the load, waits until every accepted recipient reached
the API or the bound), stops the daemon and prints, per mode, what was
accepted, delivered, lost and duplicated, and PASS/FAIL per target.

Every logical message has its own Message-ID and recipients
(``m<N>-r<J>@chaos.test``), so the API's ``to`` names one (message,
recipient) pair; resends are the same bytes to the same envelope. Every loop
is bounded by a count and a time; all traffic is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import random
import signal
import sys
import tempfile
import textwrap
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

import aiosmtplib
from aiohttp import web

from smtp_bridge.sandbox import Sandbox

__all__ = [
    "MODES",
    "ChaosSandbox",
    "Options",
    "Result",
    "main",
    "run_mode",
]

BENCH = Path(__file__).resolve().parent
LAUNCHER = BENCH / "chaos_daemon.py"
MODES = ("direct", "hybrid", "queue")
#: Upper bound of any one wait on a process or a reply.
WAIT = 30.0
#: The daemon's API timeout: a slower answer is an answer lost (sent, outcome unknown).
API_TIMEOUT = 1.0
INJECTED = "chaos: injected commit failure"
#: A call "in flight at a kill" was made at most this long before it: the API
#: timeout, plus time for its outcome's write (retried while commits fail).
IN_FLIGHT = API_TIMEOUT + 4.0


@dataclass
class Options:
    """One run's knobs (the CLI's)."""

    mode: str = "direct"
    seconds: float = 10.0
    kills: int = 0
    seed: int = 1
    clients: int = 6
    #: Fraction of the store's commits that fail (``bench/chaos_daemon.py``).
    commit_failure: float = 0.03
    #: Fraction of API calls answered after the daemon's timeout (answer lost).
    lost_answers: float = 0.01
    #: Fraction of API calls that get a scripted fault (503, reset, hang).
    api_faults: float = 0.05
    drain: float = 30.0
    workdir: Path | None = None
    max_messages: int = 100_000


_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "chaos_record", default=None
)


class _Tracking(deque[dict[str, Any]]):
    """The sandbox's record list; remembers the record its request task just added."""

    def appendleft(self, record: dict[str, Any]) -> None:
        record["answer_lost"] = False
        _current.set(record)
        super().appendleft(record)


class ChaosSandbox(Sandbox):
    """The project's sandbox, slow at random, and knowing which answers never left.

    A request whose handler is cancelled (the daemon timed out, or was killed,
    before the answer was written) has ``answer_lost`` set on its record: a call
    the API may have taken whose outcome the daemon cannot know.
    """

    def __init__(self, rng: random.Random, *, lost_answers: float) -> None:
        super().__init__(keep=1_000_000)
        self._sent = _Tracking(maxlen=1_000_000)
        self._rng = rng
        self._lost = lost_answers

    async def _delay(self) -> None:
        draw = self._rng.random()
        if draw < self._lost:
            await asyncio.sleep(API_TIMEOUT * 3)  # the daemon gives up first
        elif draw < 0.2:
            await asyncio.sleep(self._rng.uniform(0.05, 0.4))
        else:
            await asyncio.sleep(self._rng.uniform(0.0, 0.02))

    async def _handle_send(self, request: web.Request) -> web.StreamResponse:
        try:
            return await super()._handle_send(request)
        except asyncio.CancelledError:
            record = _current.get()
            if record is not None:
                record["answer_lost"] = True
            raise


# ------------------------------------------------------------------ the daemon


def write_config(path: Path, *, mode: str, state_dir: Path, api_url: str) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
            smtp:
              listen: ["127.0.0.1:0"]
              hostname: chaos.test
              timeout: 30s
              shutdown_timeout: 5s
              max_connections_per_ip: 500
            api:
              url: {json.dumps(api_url)}
              app_key: chaos-key
              timeout: {API_TIMEOUT}s
              max_concurrency: 16
              breaker_failures: 50
              breaker_interval: 500ms
            delivery:
              mode: {mode}
              state_dir: {json.dumps(str(state_dir))}
              backoff: [100ms, 300ms, 1s]
              claim_lease: 3s
              in_flow_delay: 200ms
            admin:
              listen: null
            routes:
              - name: default
                template_id: "E_CHAOS"
                data: {{subject: "{{{{ subject }}}}", body: "{{{{ text }}}}"}}
            """)
    )
    return path


class Daemon:
    """One ``chaos_daemon.py serve`` process; its stderr goes to ``log`` and is parsed."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Any, events: list[dict[str, Any]],
                 counters: Counter[str]) -> None:  # fmt: skip
        self.proc = proc
        self.events = events
        self.counters = counters
        self.port: int | None = None
        #: Set on every log line; cleared by whoever waits for the next one.
        self.changed = asyncio.Event()
        self._listening = asyncio.get_running_loop().create_future()
        self._pump = asyncio.get_running_loop().create_task(self._read(log))

    @classmethod
    async def start(cls, config: Path, env: dict[str, str], log: Any,
                    events: list[dict[str, Any]], counters: Counter[str]) -> Daemon:  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(LAUNCHER), "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        daemon = cls(proc, log, events, counters)
        async with asyncio.timeout(WAIT):
            daemon.port = await daemon._listening
        return daemon

    async def _read(self, log: Any) -> None:
        assert self.proc.stderr is not None
        try:
            while line := await self.proc.stderr.readline():
                text = line.decode(errors="replace").rstrip("\n")
                log.write(text + "\n")
                if text == INJECTED:
                    self.counters["injected_commit_failures"] += 1
                    continue
                if not text.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(text)
                    event["_seen"] = time.time()  # the harness's clock, as kill_times
                    self.events.append(event)
                    self.changed.set()
                    self.counters[str(event.get("event"))] += 1
                    if event.get("event") == "listening" and not self._listening.done():
                        self._listening.set_result(int(event["address"].rpartition(":")[2]))
        finally:
            log.flush()
            if not self._listening.done():
                self._listening.set_exception(RuntimeError("daemon exited before listening"))

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.wait()

    async def terminate(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            await self.kill()
            return -9

    async def wait(self) -> int:
        async with asyncio.timeout(WAIT):
            code = await self.proc.wait()
            await self._pump
        return code


async def start_daemon(config: Path, env: dict[str, str], log: Any,
                       events: list[dict[str, Any]], counters: Counter[str]) -> Daemon:  # fmt: skip
    """Start the daemon as systemd's ``Restart=on-failure`` would: a start refused
    (a store write failed during startup: ``cannot start``) is tried again, bounded."""
    for _ in range(20):
        counters["starts"] += 1  # each start its own fault sequence
        seeded = {**env, "CHAOS_SEED": str(int(env["CHAOS_SEED"]) * 1000 + counters["starts"])}
        try:
            return await Daemon.start(config, seeded, log, events, counters)
        except RuntimeError:
            counters["start_refused"] += 1
    raise RuntimeError("the daemon did not start in 20 tries (see daemon.log)")


async def queue_rcpts(config: Path, *, dead: bool = False) -> set[str]:
    """What ``smtp-bridge queue list [--dead]`` lists, by recipient: the same config
    loader, store and query in this process (no fault injection here)."""
    from smtp_bridge.config import load_config
    from smtp_bridge.store import open_store

    store = await open_store(load_config(config).delivery, create=False)
    try:
        rows = await store.list_queue(dead=dead, limit=100_000)
    finally:
        await store.close()
    return {record.rcpt.lower() for _, record in rows}


# ------------------------------------------------------------------ the load


@dataclass
class Logical:
    """One logical message: its bytes, its envelope, and what its clients heard."""

    number: int
    rcpts: list[str]
    content: bytes
    replies: list[str] = field(default_factory=list)
    accepted: bool = False


def make_logical(run: str, number: int, rng: random.Random) -> Logical:
    rcpts = [f"m{number}-r{j}@chaos.test" for j in range(rng.randint(1, 3))]
    msg = EmailMessage()
    msg["From"] = "app@chaos.test"
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = f"chaos {run} #{number}"
    msg["Message-ID"] = f"<chaos-{run}-{number}@chaos.test>"
    msg.set_content(f"marker chaos-{run}-{number}\n" + "x" * rng.randint(0, 2000))
    return Logical(number, rcpts, msg.as_bytes(policy=SMTP_POLICY))


class Load:
    """Several SMTP clients; the daemon's current port comes from ``port()``."""

    def __init__(self, opts: Options, rng: random.Random, port: Any, run: str) -> None:
        self.opts = opts
        self.rng = rng
        self.port = port
        self.run = run
        self.messages: list[Logical] = []
        self.stop = asyncio.Event()
        self.stats: Counter[str] = Counter()

    async def attempt(self, m: Logical, *, cut: float | None = None) -> int | None:
        """One SMTP transaction: the DATA reply code, or None (no answer: cut, refused)."""
        port = self.port()
        if port is None:
            return None
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=WAIT)
        try:
            await smtp.connect()
            if cut is not None:
                # The lost 250: the client gives up on the reply while the call runs.
                sent = smtp.sendmail("app@chaos.test", m.rcpts, m.content)
                _, text = await asyncio.wait_for(sent, cut)
                code = 250
            else:
                _, text = await smtp.sendmail("app@chaos.test", m.rcpts, m.content)
                code = 250
        except aiosmtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[0].code, exc.recipients[0].message
        except aiosmtplib.SMTPResponseException as exc:
            code, text = exc.code, exc.message
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.stats["no_answer"] += 1
            return None
        finally:
            smtp.close()
        m.replies.append(f"{code} {text}")
        self.stats[f"reply_{code}"] += 1
        if code == 250:
            m.accepted = True
            if "already delivered" in text:
                self.stats["already_delivered"] += 1
            elif "already queued" in text:
                self.stats["already_queued"] += 1
        return code

    async def until_accepted(self, m: Logical, deadline: float) -> None:
        """An MTA's retries: resend the same bytes after a 4xx or no answer, bounded."""
        for tries in range(12):
            if tries:
                self.stats["resent_after_failure"] += 1
            code = await self.attempt(m)
            if code is not None and not 400 <= code < 500:
                return  # accepted, or refused for good
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))  # an MTA's backoff, not a sync

    async def one(self, m: Logical, deadline: float) -> None:
        kind = self.rng.random()
        if kind < 0.1:  # back to back
            await self.until_accepted(m, deadline)
            self.stats["resent_back_to_back"] += 1
            await self.until_accepted(m, deadline)
        elif kind < 0.2:  # a second copy while the first one's call runs
            self.stats["resent_during_call"] += 1
            second = asyncio.ensure_future(self._later(m, deadline, self.rng.uniform(0, 0.05)))
            await self.until_accepted(m, deadline)
            await second
        elif kind < 0.25:  # the client loses the reply, then resends
            self.stats["cut_then_resent"] += 1
            await self.attempt(m, cut=self.rng.uniform(0.005, 0.05))
            await self.until_accepted(m, deadline)
        else:
            await self.until_accepted(m, deadline)

    async def _later(self, m: Logical, deadline: float, delay: float) -> None:
        await asyncio.sleep(delay)  # stagger the copy into the first one's call
        await self.until_accepted(m, deadline)

    async def client(self, deadline: float) -> None:
        while not self.stop.is_set() and len(self.messages) < self.opts.max_messages:
            m = make_logical(self.run, len(self.messages), self.rng)
            self.messages.append(m)
            # A message in hand is finished (retries bounded) even after stop.
            await self.one(m, deadline)

    async def run_clients(self, deadline: float) -> None:
        await asyncio.gather(*(self.client(deadline) for _ in range(self.opts.clients)))


# ------------------------------------------------------------------ one mode


@dataclass
class Result:
    """What one mode's run saw."""

    mode: str
    kills: int
    messages: int
    accepted: int
    accepted_pairs: int
    delivered_pairs: int
    calls: int
    lost: list[str]
    dead: list[str]
    still_spooled: list[str]
    duplicated: dict[str, int]
    unlogged: list[str]
    unexplained: list[str]
    by_answer_lost: list[str]
    possible_duplicate_lines: int
    counters: dict[str, int]
    load: dict[str, int]

    def targets(self) -> list[tuple[str, bool, str]]:
        """(target, held, the figure it reads)."""
        return [
            ("0 lost", not self.lost, f"{len(self.lost)} lost"),
            ("drained: nothing left in the spool", not self.still_spooled,
             f"{len(self.still_spooled)} still spooled"),
            ("every duplicate logged as possible_duplicate", not self.unlogged,
             f"{len(self.unlogged)} unlogged"),
            ("duplicates only for calls in flight at a kill (or whose API answer was lost)",
             not self.unexplained, f"{len(self.unexplained)} otherwise"),
        ]  # fmt: skip

    def report(self) -> str:
        lines = [
            f"== {self.mode}: {self.messages} messages, {self.kills} kills, "
            f"{self.counters.get('injected_commit_failures', 0)} injected commit failures",
            f"  accepted (250)     {self.accepted} messages, {self.accepted_pairs} (msg, rcpt)",
            f"  delivered          {self.delivered_pairs} (msg, rcpt), {self.calls} API calls",
            f"  lost               {len(self.lost)}  {self.lost[:5]}",
            f"  dead letters       {len(self.dead)}  {self.dead[:5]}",
            f"  duplicated         {len(self.duplicated)}  "
            f"(of which an API answer lost: {len(self.by_answer_lost)})",
            f"  dup. without log   {len(self.unlogged)}  {self.unlogged[:5]}",
            f"  dup. unexplained   {len(self.unexplained)}  {self.unexplained[:5]}",
            f"  possible_duplicate {self.possible_duplicate_lines} lines",
            "  log: "
            + ", ".join(
                f"{k} {self.counters.get(k, 0)}"
                for k in (
                    "outcome_recorded_late",
                    "outcome_unrecorded",
                    "duplicate_skipped",
                    "spool_recovered",
                    "unexpected_exits",
                    "start_refused",
                )
            ),  # fmt: skip
            "  load: " + ", ".join(f"{k} {v}" for k, v in sorted(self.load.items())),
        ]
        for name, held, figure in self.targets():
            lines.append(f"  {'PASS' if held else 'FAIL'}  {name}: {figure}")
        return "\n".join(lines)


def _stamp(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


async def run_mode(opts: Options) -> Result:
    """One bounded chaos run in ``opts.mode``; the figures and targets."""
    rng = random.Random(f"{opts.seed}-{opts.mode}")
    own = opts.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{opts.mode}-")) if own else opts.workdir
    assert workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    run = f"{opts.mode}{opts.seed}"
    sandbox = ChaosSandbox(rng, lost_answers=opts.lost_answers)
    api_url = await sandbox.start("127.0.0.1", 0)
    config = write_config(
        workdir / "config.yaml", mode=opts.mode, state_dir=workdir / "state", api_url=api_url
    )
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env.update(
        PYTHONUNBUFFERED="1",
        CHAOS_COMMIT_FAILURE=str(opts.commit_failure),
        CHAOS_SEED=str(opts.seed),
    )
    events: list[dict[str, Any]] = []
    counters: Counter[str] = Counter()
    kill_times: list[float] = []
    log = (workdir / "daemon.log").open("a")
    daemon: Daemon | None = await start_daemon(config, env, log, events, counters)
    load = Load(opts, rng, lambda: daemon.port if daemon is not None else None, run)
    start = time.monotonic()
    end = start + opts.seconds
    try:
        clients = asyncio.ensure_future(load.run_clients(end + opts.drain))
        faults = asyncio.ensure_future(_api_faults(sandbox, rng, opts, end))
        kill_at = sorted(rng.uniform(0.1, 0.85) * opts.seconds for _ in range(opts.kills))
        for offset in kill_at:
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))  # a random moment
            assert daemon is not None
            old, daemon = daemon, None
            await old.kill()
            # Taken once the process is gone: a call it wrote just before the
            # SIGKILL can reach the sandbox a few ms after the signal was sent.
            kill_times.append(time.time())
            daemon = await start_daemon(config, env, log, events, counters)
        while time.monotonic() < end:  # bounded: restart a daemon that died by itself
            assert daemon is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(daemon.proc.wait()), end - time.monotonic())
            if daemon.proc.returncode is not None and time.monotonic() < end:
                counters["unexpected_exits"] += 1
                daemon = await start_daemon(config, env, log, events, counters)
        load.stop.set()
        await faults
        sandbox._scripts.clear()  # the drain runs against a healthy API
        async with asyncio.timeout(opts.drain + WAIT):
            await clients
        assert daemon is not None
        await _drain(sandbox, load, daemon, config, opts.drain)
        await daemon.terminate()
        daemon = None
        waiting = await queue_rcpts(config)
        dead = await queue_rcpts(config, dead=True)
    finally:
        if daemon is not None:
            await daemon.kill()
        await sandbox.stop()
        log.close()
    result = _judge(opts, load, sandbox, events, counters, kill_times, waiting, dead)
    # What a FAIL needs to be understood: every API call and the kill times.
    (workdir / "calls.json").write_text(
        json.dumps({"kills": kill_times, "calls": sandbox.sent()}, default=str)
    )
    return result


async def _api_faults(sandbox: Sandbox, rng: random.Random, opts: Options, end: float) -> None:
    """Now and then a scripted fault for the next call: 503, a reset, a hang (bounded)."""
    for _ in range(100_000):
        if time.monotonic() >= end:
            return
        await asyncio.sleep(rng.uniform(0.05, 0.2))  # the faults' own random pace
        if rng.random() < opts.api_faults * 4:
            fault = rng.choice([{"status": 503}, {"action": "reset"}, {"action": "hang"}])
            sandbox.script({**fault, "times": 1})


def _delivered(sandbox: Sandbox) -> Counter[str]:
    return Counter(r["to"] for r in sandbox.sent() if r["code"] == 200)


async def _drain(sandbox: Sandbox, load: Load, daemon: Daemon, config: Path, bound: float) -> None:
    """Until the bound: wait on the sandbox's count until every accepted pair reached
    it, then on the daemon's log lines until ``queue list`` shows an empty spool
    (retries of calls whose answer was lost may still be due)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(bound):
            while True:
                wanted = {r for m in load.messages if m.accepted for r in m.rcpts}
                if wanted <= set(_delivered(sandbox)):
                    break
                await sandbox.wait_sent(sandbox._received + 1)
            for _ in range(10_000):
                daemon.changed.clear()
                if not await queue_rcpts(config):
                    return
                await daemon.changed.wait()


def _timed_out(events: list[dict[str, Any]], to: str, first: float, second: float) -> bool:
    """The daemon did not get the first call's answer in time: its ``api_call`` line for
    the recipient says ``unknown`` (a timeout or reset after the request left). On a
    loaded machine an answer the sandbox sent on time can still reach the daemon
    after ``api.timeout``; the call is then an answer lost, as the ones the sandbox
    holds back on purpose, and sending again is at-least-once by the contract."""
    return any(
        e.get("event") == "api_call"
        and e.get("result") == "unknown"
        and str(e.get("rcpt", "")).lower() == to
        and first <= e["_seen"] <= second + 1.0
        for e in events
    )


def _unrecorded(events: list[dict[str, Any]], to: str, sent: float, killed: float) -> bool:
    """The call's outcome was still not on record when the daemon was killed: its write
    had failed (``store_error`` naming the recipient, retried by the worker) and no
    ``delivered`` line for it came before the kill. Such a call is still in flight
    (issue 11: an outcome whose write failed is kept until it is on record), however
    long ago it was made."""
    seen = [
        e for e in events if str(e.get("rcpt", "")).lower() == to and sent <= e["_seen"] < killed
    ]
    failed = any(e.get("event") == "store_error" for e in seen)
    return failed and not any(e.get("event") == "delivered" for e in seen)


def _judge(opts: Options, load: Load, sandbox: Sandbox, events: list[dict[str, Any]],
           counters: Counter[str], kill_times: list[float], spooled: set[str],
           dead_rcpts: set[str]) -> Result:  # fmt: skip
    records = sandbox.sent()
    delivered = _delivered(sandbox)
    accepted = [m for m in load.messages if m.accepted]
    pairs = {r for m in accepted for r in m.rcpts}
    logged = {
        str(e.get("rcpt", "")).lower() for e in events if e.get("event") == "possible_duplicate"
    }
    duplicated = {to: n for to, n in delivered.items() if n > 1}
    unexplained, by_lost = [], []
    for to in duplicated:
        calls = sorted((r for r in records if r["to"] == to and r["code"] == 200), key=_stamp)
        explained = lost_answer = True
        for first, second in zip(calls, calls[1:], strict=False):
            at_kill = any(
                _stamp(first) <= k <= _stamp(second)
                and (k - _stamp(first) <= IN_FLIGHT or _unrecorded(events, to, _stamp(first), k))
                for k in kill_times
            )
            lost = first["answer_lost"] or _timed_out(events, to, _stamp(first), _stamp(second))
            if not at_kill and not lost:
                explained = False
            if at_kill:
                lost_answer = False
        if not explained:
            unexplained.append(to)
        elif lost_answer:
            by_lost.append(to)
    return Result(
        mode=opts.mode,
        kills=len(kill_times),
        messages=len(load.messages),
        accepted=len(accepted),
        accepted_pairs=len(pairs),
        delivered_pairs=len(set(delivered) & pairs),
        calls=len(records),
        lost=sorted(p for p in pairs if p not in delivered and p not in dead_rcpts | spooled),
        dead=sorted(dead_rcpts),
        still_spooled=sorted(spooled),
        duplicated=duplicated,
        unlogged=sorted(to for to in duplicated if to not in logged),
        unexplained=sorted(unexplained),
        by_answer_lost=sorted(by_lost),
        possible_duplicate_lines=counters.get("possible_duplicate", 0),
        counters=dict(counters),
        load=dict(load.stats),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per mode")
    parser.add_argument("--kills", type=int, default=0, help="SIGKILLs per mode")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--commit-failure", type=float, default=0.03)
    parser.add_argument("--lost-answers", type=float, default=0.01)
    parser.add_argument("--api-faults", type=float, default=0.05)
    parser.add_argument("--drain", type=float, default=30.0, help="bound of the drain")
    parser.add_argument("--keep", type=Path, help="keep logs and stores under this directory")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600 or not 0 <= args.kills <= 100:
        parser.error("--seconds must be in (0, 3600], --kills in [0, 100]")
    ok = True
    for mode in MODES if args.mode == "all" else (args.mode,):
        opts = Options(
            mode=mode, seconds=args.seconds, kills=args.kills, seed=args.seed,
            clients=args.clients, commit_failure=args.commit_failure,
            lost_answers=args.lost_answers, api_faults=args.api_faults, drain=args.drain,
            workdir=args.keep / mode if args.keep else None,
        )  # fmt: skip
        result = asyncio.run(run_mode(opts))
        print(result.report(), flush=True)
        ok = ok and all(held for _, held, _ in result.targets())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
