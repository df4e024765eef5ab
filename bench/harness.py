"""Building blocks of the benchmark: processes, their CPU and memory, one load run.

Every server, the sandbox API and the load generator run as separate processes,
pinned with ``sched_setaffinity`` before they exec (so every thread they start
inherits it). CPU comes from ``/proc/PID/stat`` (utime + stime of the process
and its live descendants, plus cutime + cstime of the ones reaped); peak memory
is ``VmHWM`` from ``/proc/PID/status``, summed over the same process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
APP_KEY = "bench-key"
MiB = 1024 * 1024

BRIDGE_CONFIG = """\
smtp:
  listen: ["127.0.0.1:0"]
  hostname: bench.local
api:
  url: {api_url}
  app_key: {app_key}
  timeout: 10s
delivery:
  mode: {mode}
  state_dir: {state_dir}{store}
admin:
  listen: null
routes:
  - name: password-reset
    match:
      subject: 're:reset your password'
    template_id: "E_1001"
    data:
      name: "{{{{ rcpt.local }}}}"
      link: "{{{{ text | regex_search('https://\\\\S+') }}}}"
  - name: otp
    match: {{subject: 're:code (?P<code>\\d{{6}})'}}
    template_id: "E_1002"
    data: {{code: "{{{{ match.code }}}}"}}
  - name: default
    template_id: "E_GENERIC"
    alias: "{{{{ sender.name or 'Billing' }}}}"
    data: {{subject: "{{{{ subject }}}}", body: "{{{{ text }}}}"}}
"""


def cpu_sets() -> tuple[set[int], set[int]]:
    """(server cores, load cores): different ones when there are at least two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    return {cpus[0]}, set(cpus[1:])


def all_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- /proc


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (live ones, and reaped ones' totals)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def busy_seconds(cpus: set[int] | None = None) -> float:
    """CPU time all processes spent on ``cpus`` (all cores if None), from /proc/stat."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
            total += user + nice + system + irq + softirq + steal
    return total / CLK_TCK


def runqueue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` and its descendants spent runnable but not running
    (``/proc/PID/task/TID/schedstat``): how much the machine's other load cost them."""
    total = 0
    for p in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """VmHWM of ``pid`` and its descendants, in MB (10^6 bytes)."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid)) * 1024 / 1e6


def rss_mb(pid: int) -> float:
    """VmRSS now, of ``pid`` and its descendants, in MB."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) * 1024 / 1e6


# --------------------------------------------------------------------------- processes


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        # 1,000 idle connections need more descriptors than the usual soft limit.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.setpgrp()  # a Ctrl-C of the harness does not hit it; the harness stops it

    return setup


@dataclass
class Proc:
    """A started server (or sandbox): its process, address and log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    address: tuple[str, int] = ("", 0)
    url: str = ""
    workdir: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        lines.append(doc)
        return lines


def _spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    cpus: set[int] | None,
    pattern: re.Pattern[str],
    cwd: Path = ROOT,
) -> tuple[Proc, re.Match[str]]:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd,
            preexec_fn=_preexec(cpus),
        )
    proc = Proc(name, popen, log_path, workdir=workdir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            found = pattern.search(f.read())
        if found:
            return proc, found
        if popen.poll() is not None:
            break
        time.sleep(0.02)
    proc.stop()
    text = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{name} did not start (exit {popen.poll()}):\n{text}")


_LISTENING = re.compile(r'"event":\s*"listening".*?"address":\s*"([^"]+):(\d+)"')
_SANDBOX = re.compile(r"sandbox listening on (http://\S+)")


def start_sandbox(latency: float, workdir: Path, cpus: set[int] | None) -> Proc:
    argv = [PYTHON, "-m", "smtp_bridge", "sandbox", "--listen", "127.0.0.1:0"]
    argv += ["--latency", str(latency)]
    proc, found = _spawn(f"sandbox-{int(latency * 1000)}ms", argv, workdir, cpus, _SANDBOX)
    proc.url = found.group(1)
    return proc


def start_server(
    kind: str,
    *,
    api_url: str,
    workdir: Path,
    cpus: set[int] | None,
    mode: str = "direct",
    workers: int = 1,
    extra_config: str = "",
    tree: Path | None = None,
    store_url: str | None = None,
) -> Proc:
    """Start ``bare``, ``naive`` or ``bridge`` (smtp-bridge serve) on an ephemeral port.

    ``tree``: run the smtp_bridge package found in that directory instead of this
    checkout's (``python -m`` imports from the working directory first).
    ``store_url``: the bridge's ``delivery.store`` (PostgreSQL, say) instead of
    SQLite under its state directory.
    """
    if kind == "bare":
        argv = [PYTHON, str(BENCH / "bare.py")]
    elif kind == "naive":
        argv = [PYTHON, str(BENCH / "naive.py"), api_url]
    elif kind == "bridge":
        state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
        config = workdir / f"config-{state_dir.name}.yaml"
        store = f"\n  store: {json.dumps(store_url)}" if store_url else ""
        text = BRIDGE_CONFIG.format(
            api_url=api_url, app_key=APP_KEY, mode=mode, state_dir=state_dir, store=store
        )
        config.write_text(text + extra_config)
        argv = [PYTHON, "-m", "smtp_bridge", "serve", "--config", str(config)]
        if workers != 1:
            argv += ["--workers", str(workers)]
    else:
        raise ValueError(kind)
    proc, found = _spawn(kind, argv, workdir, cpus, _LISTENING, cwd=tree or ROOT)
    proc.address = (found.group(1), int(found.group(2)))
    if kind == "bridge":
        proc.workdir = state_dir
        if workers > 1:
            _wait_listening(proc, workers)
    return proc


def _wait_listening(proc: Proc, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [line for line in proc.log_lines() if line.get("event") == "listening"]
        if len(found) >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: fewer than {count} workers listening")


def state_db(proc: Proc) -> Path:
    assert proc.workdir is not None
    return proc.workdir / "state.sqlite3"


def query_state(proc: Proc, sql: str) -> list[tuple[Any, ...]]:
    """Read the bridge's state store (WAL lets us read beside its writer)."""
    path = state_db(proc)
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def serve_accepts_workers() -> bool:
    out = subprocess.run(
        [PYTHON, "-m", "smtp_bridge", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    return "--workers" in out.stdout


def config_accepts_mode(mode: str, workdir: Path) -> bool:
    config = workdir / f"check-{mode}.yaml"
    config.write_text(
        BRIDGE_CONFIG.format(
            api_url="http://127.0.0.1:9/x", app_key=APP_KEY, mode=mode, state_dir=workdir, store=""
        )
    )
    out = subprocess.run(
        [PYTHON, "-m", "smtp_bridge", "check-config", "--config", str(config)],
        capture_output=True,
        cwd=ROOT,
        check=False,
    )
    return out.returncode == 0


# --------------------------------------------------------------------------- load


@dataclass
class LoadSpec:
    connections: int = 32
    per_session: int = 10
    rcpts: int = 1
    size: int = 2048
    count: int = 100_000
    duration: float = 5.0
    warmup: float = 1.0
    open_rate: float = 0.0  # > 0: open loop, arrivals a second

    def argv(self) -> list[str]:
        return [
            f"--open-rate={self.open_rate}",
            f"--connections={self.connections}",
            f"--per-session={self.per_session}",
            f"--rcpts={self.rcpts}",
            f"--size={self.size}",
            f"--count={self.count}",
            f"--duration={self.duration}",
            f"--warmup={self.warmup}",
        ]


@dataclass
class Sample:
    """What one measured window gave, for one server."""

    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms_per_msg: float = 0.0
    server_cpu: float = 0.0  # cores busy during the window (1.0 = one core)
    server_wait: float = 0.0  # share of the window its threads waited for a CPU
    others_cpu: float = 0.0  # cores used by every other process on the machine meanwhile
    peak_rss_mb: float = 0.0
    sandbox_cpu: float = 0.0
    loadgen_cpu: float = 0.0
    ok: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _loadgen(
    port: int, argv: Sequence[str], cpus: set[int] | None
) -> Iterator[subprocess.Popen[str]]:
    popen = subprocess.Popen(
        [PYTHON, str(BENCH / "loadgen.py"), f"--port={port}", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=_preexec(cpus),
    )
    try:
        yield popen
    finally:
        if popen.poll() is None:
            popen.kill()
        popen.wait()
        for stream in (popen.stdin, popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _expect(popen: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert popen.stdout is not None
    # A bounded wait: the load generator is bounded in time; a hang is a bug.
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"load generator: no {prefix} within {timeout:.0f}s")
            line = popen.stdout.readline()
            if not line:
                raise RuntimeError(f"load generator exited before {prefix}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()


def run_load(
    server: Proc,
    spec: LoadSpec,
    cpus: set[int] | None,
    *,
    sandbox: Proc | None = None,
    after: Callable[[], dict[str, float]] | None = None,
) -> Sample:
    """One measured window against ``server``; ``after`` may extend it (queue drain)."""
    with _loadgen(server.address[1], spec.argv(), cpus) as popen:
        _expect(popen, "READY", spec.warmup + 60)
        cpu0 = cpu_seconds(server.pid)
        wait0 = runqueue_wait(server.pid)
        sb0 = cpu_seconds(sandbox.pid) if sandbox else 0.0
        busy0 = busy_seconds()
        t0 = time.perf_counter()
        assert popen.stdin is not None
        popen.stdin.write("GO\n")
        popen.stdin.flush()
        result = json.loads(_expect(popen, "END", spec.duration + 120))
        extra = after() if after is not None else {}
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(server.pid) - cpu0
        wait = runqueue_wait(server.pid) - wait0
        sb = cpu_seconds(sandbox.pid) - sb0 if sandbox else 0.0
        busy = busy_seconds() - busy0
        popen.wait(30)
    ok = result["ok"]
    return Sample(
        rate=result["rate"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        cpu_ms_per_msg=cpu * 1000 / ok if ok else 0.0,
        server_cpu=cpu / wall,
        server_wait=wait / wall,
        # The load generator's own CPU is in its result, over its (slightly shorter) window.
        others_cpu=max(0.0, busy - cpu - sb - result["loadgen_cpu"] * result["elapsed"]) / wall,
        peak_rss_mb=peak_rss_mb(server.pid),
        sandbox_cpu=sb / wall,
        loadgen_cpu=result["loadgen_cpu"],
        ok=ok,
        replies=result["replies"],
        errors=result["errors"],
        extra={**result.get("extra", {}), **extra},
    )


def dead_api_url(api_url: str) -> str:
    """``api_url`` on a loopback port nothing listens on: every call is refused."""
    import socket
    from urllib.parse import urlsplit, urlunsplit

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parts = urlsplit(api_url)
    return urlunsplit((parts.scheme, f"127.0.0.1:{port}", parts.path, "", ""))


def idle_connections(server: Proc, count: int, cpus: set[int] | None) -> dict[str, float]:
    """Open ``count`` idle sessions (banner + EHLO); the server's RSS while they are open."""
    before = rss_mb(server.pid)
    with _loadgen(server.address[1], [f"--idle={count}"], cpus) as popen:
        opened = json.loads(_expect(popen, "READY", 120))
        time.sleep(0.5)
        result = {
            "open": float(opened["open"]),
            "failed": float(opened["failed"]),
            "rss_before_mb": before,
            "rss_mb": rss_mb(server.pid),
            "peak_rss_mb": peak_rss_mb(server.pid),
        }
        assert popen.stdin is not None
        popen.stdin.write("GO\n")
        popen.stdin.flush()
        popen.wait(30)
    return result


def big_message(server: Proc, size: int, cpus: set[int] | None) -> dict[str, float]:
    """Send one message of ``size`` bytes after a small warm-up; peak memory it cost."""
    warm = LoadSpec(connections=1, per_session=5, count=5, duration=10, warmup=0.0)
    warmed = run_load(server, warm, cpus)
    before = rss_mb(server.pid)
    peak_before = peak_rss_mb(server.pid)
    spec = LoadSpec(connections=1, per_session=1, size=size, count=1, duration=60, warmup=0.0)
    sample = run_load(server, spec, cpus)
    peak = peak_rss_mb(server.pid)
    return {
        "ok": float(sample.ok + warmed.ok),
        "size_mb": size / 1e6,
        "rss_before_mb": before,
        "peak_before_mb": peak_before,
        "peak_rss_mb": peak,
        "peak_over_size": (peak - before) / (size / 1e6),
        "latency_ms": sample.p50_ms,
    }
