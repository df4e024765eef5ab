"""smtp-bridge benchmark: the bridge beside its baselines, and the targets it must show.

One command, on loopback, starts and drives each server in its own process:
(a) a bare aiosmtpd server answering 250 (the stack's ceiling), (b) a naive
bridge (stdlib email parse + one aiohttp POST per recipient) and (c)
smtp-bridge in direct, hybrid and queue modes, all against the sandbox API in
a process of its own. Each section runs in interleaved rounds (every server
once per round, freshly started, the order reversed every other round) and
every figure is the median over the rounds (``--runs``, 8).

    .venv/bin/python bench/run.py            # the full benchmark (about 15 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke test: 1 round, small counts

Sections: ``throughput`` (32 clients, API at 0 ms: CPU per message, hybrid
against direct), ``per-session`` (one message per connection), ``open-loop``
(fixed arrival rate, API at 50 ms: DATA-reply latency), ``api-down`` (queue
mode with the API refusing connections: the spool's accept rate), ``memory``
(idle connections, a 10 MiB message), and on request ``workers``.
``--store-url postgresql://...`` adds the bridge rows again with that
``delivery.store`` (target 6). Issue 15's targets are printed as PASS/FAIL,
each with its figure and the baseline figures it was read against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import harness
from harness import LoadSpec, Proc, Sample

MODES = ("direct", "hybrid", "queue")
SECTIONS = ("throughput", "per-session", "open-loop", "api-down", "memory", "workers")
DEFAULT_SECTIONS = ("throughput", "per-session", "open-loop", "api-down", "memory")
#: Open loop: the API's latency, and the closed-loop clients that saturate the naive
#: bridge there (32 clients / 50 ms could not: Little's law caps them at 640/s).
OPEN_LOOP_LATENCY_MS = 50
SATURATING_CLIENTS = 128
#: Open loop: sessions carrying the arrivals (a free one is always there).
OPEN_LOOP_SESSIONS = 64
PG = "-pg"  # suffix of the rows run with --store-url
BASE = "@base"  # suffix of the rows run from --baseline-tree


@dataclass
class Row:
    """The median figures of one server at one API latency."""

    name: str
    latency_ms: int
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    def median(self, attr: str) -> float:
        values = [getattr(s, attr) for s in self.samples]
        return statistics.median(values) if values else 0.0

    def extra(self, key: str) -> float:
        values = [s.extra[key] for s in self.samples if key in s.extra]
        return statistics.median(values) if values else float("nan")

    @property
    def errors(self) -> int:
        return sum(
            sum(s.errors.values()) + sum(n for code, n in s.replies.items() if code != "250")
            for s in self.samples
        )


@dataclass
class Case:
    """One server configuration a section runs once per round."""

    name: str  # the row's name
    kind: str  # bare, naive, bridge
    mode: str = "direct"
    store_url: str | None = None
    api_down: bool = False
    tree: Path | None = None  # run the smtp_bridge package of this directory


Target = tuple[str, str, bool | None, str]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="smtp-bridge-bench-"))
        self.server_cpus, self.load_cpus = harness.cpu_sets()
        self.spec = LoadSpec(
            connections=args.connections,
            per_session=args.per_session,
            rcpts=args.rcpts,
            size=args.size,
            count=args.count,
            duration=args.duration,
            warmup=args.warmup,
        )
        self.sandboxes: dict[float, Proc] = {}
        self.rows: dict[tuple[str, int], Row] = {}
        self.skipped: dict[str, str] = {}
        self.idle: list[dict[str, float]] = []
        self.big: list[dict[str, float]] = []
        self.open_rate: float | None = args.open_rate
        self.open_rate_note = "given with --open-rate" if args.open_rate else ""
        self.log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ runs

    def sandbox(self, latency: float) -> Proc:
        if latency not in self.sandboxes:
            self.sandboxes[latency] = harness.start_sandbox(latency, self.workdir, self.load_cpus)
        return self.sandboxes[latency]

    def one_run(
        self,
        kind: str,
        latency: float,
        *,
        mode: str = "direct",
        workers: int = 1,
        spec: LoadSpec | None = None,
        server_cpus: set[int] | None = None,
        load_cpus: set[int] | None = None,
        sandbox: Proc | None = None,
        store_url: str | None = None,
        api_down: bool = False,
        tree: Path | None = None,
    ) -> Sample:
        sandbox = sandbox or self.sandbox(latency)
        api_url = harness.dead_api_url(sandbox.url) if api_down else sandbox.url
        server = harness.start_server(
            kind,
            api_url=api_url,
            workdir=self.workdir,
            cpus=server_cpus or self.server_cpus,
            mode=mode,
            workers=workers,
            tree=tree or self.args.bridge_tree,
            store_url=store_url,
        )
        try:
            drain = mode == "queue" and kind == "bridge" and not api_down and not store_url
            after = self._drain(server) if drain else None
            return harness.run_load(
                server,
                spec or self.spec,
                load_cpus or self.load_cpus,
                sandbox=None if api_down else sandbox,
                after=after,
            )
        finally:
            server.stop()

    def _drain(self, server: Proc) -> Callable[[], dict[str, float]]:
        """Queue mode: after the window, wait (bounded) until every recipient is delivered."""

        def wait() -> dict[str, float]:
            ended = time.perf_counter()
            limit = ended + max(30.0, 4 * self.spec.duration)
            backlog = 0
            while time.perf_counter() < limit:
                rows = harness.query_state(
                    server,
                    "SELECT COUNT(*), COALESCE(SUM(state = 'delivered'), 0) FROM recipients",
                )
                total, delivered = rows[0] if rows else (0, 0)
                backlog = total - delivered
                if total and not backlog:
                    break
                time.sleep(0.05)
            return {"drain_s": time.perf_counter() - ended, "backlog": float(backlog)}

        return wait

    def record(self, name: str, latency: float, sample: Sample, round_: int) -> None:
        """Add one run's sample to its row (a row per server and API latency)."""
        if "drain_s" in sample.extra:
            window = sample.ok / sample.rate if sample.rate else 0.0
            sample.extra["pace"] = window / (window + sample.extra["drain_s"]) if window else 0
        key = (name, round(latency * 1000))
        row = self.rows.setdefault(key, Row(name, key[1]))
        row.samples.append(sample)
        self.log(
            f"  round {round_ + 1}  {name:<16} {key[1]:>3} ms: {sample.rate:7.0f} msgs/s"
            f"  p50 {sample.p50_ms:6.1f}  p99 {sample.p99_ms:6.1f} ms"
            f"  {sample.cpu_ms_per_msg:5.2f} CPU ms/msg"
            f"  server CPU {sample.server_cpu:4.2f}  other {sample.others_cpu:4.2f}"
            f"  errors {sum(sample.errors.values())}"
        )

    def rounds(
        self, cases: list[Case], latency: float, spec: LoadSpec | None = None, runs: int = 0
    ) -> None:
        """Every case once per round, in order, then reversed the next round (the
        first, a baseline such as the bare server, stays first): a busy spell on the
        machine hits all alike, and no server always follows the same one."""
        for round_ in range(runs or self.args.runs):
            order = cases if round_ % 2 == 0 else [cases[0], *reversed(cases[1:])]
            for case in order:
                sample = self.one_run(
                    case.kind,
                    latency,
                    mode=case.mode,
                    spec=spec,
                    store_url=case.store_url,
                    api_down=case.api_down,
                    tree=case.tree,
                )
                self.record(case.name, latency, sample, round_)

    def bridge_cases(self, modes: list[str], suffix: str = "", **extra: Any) -> list[Case]:
        """The bridge in each mode; with --store-url, again on that store; with
        --baseline-tree, again from that checkout (rows named ``mode@base``)."""
        modes = [m for m in modes if m not in self.skipped]
        cases = [Case(f"{m}{suffix}", "bridge", m, **extra) for m in modes]
        if self.args.store_url:
            url = self.args.store_url
            cases += [Case(f"{m}{PG}{suffix}", "bridge", m, url, **extra) for m in modes]
        if self.args.baseline_tree:
            tree = self.args.baseline_tree
            cases += [Case(f"{m}{BASE}{suffix}", "bridge", m, tree=tree, **extra) for m in modes]
        return cases

    def probe_mode(self, mode: str) -> str:
        """'' when smtp-bridge really runs ``mode``, else why its rows are skipped."""
        if not harness.config_accepts_mode(mode, self.workdir):
            return f"delivery.mode: {mode} is refused by the config"
        if mode == "direct":
            return ""
        server = harness.start_server(
            "bridge",
            api_url=self.sandbox(0.0).url,
            workdir=self.workdir,
            cpus=self.server_cpus,
            mode=mode,
            tree=self.args.bridge_tree,
        )
        try:
            spec = LoadSpec(connections=1, per_session=3, count=3, duration=10, warmup=0)
            harness.run_load(server, spec, self.load_cpus)
            recorded = {m for (m,) in harness.query_state(server, "SELECT mode FROM messages")}
        finally:
            server.stop()
        if mode not in recorded:
            seen = ", ".join(sorted(recorded)) or "nothing"
            return f"mode {mode} not implemented yet (the store recorded {seen})"
        return ""

    @property
    def latencies(self) -> list[float]:
        return [ms / 1000 for ms in self.args.latency]

    def run(self) -> None:
        args = self.args
        self.log(
            f"workdir {self.workdir}; server cores {sorted(self.server_cpus)}, "
            f"load + sandbox cores {sorted(self.load_cpus)}"
        )
        for mode in [m for m in MODES if m in args.modes]:
            reason = self.probe_mode(mode)
            if reason:
                self.skipped[mode] = reason
                self.log(f"  skipping {mode}: {reason}")
        if "throughput" in args.sections:
            self.measure_throughput()
        if "per-session" in args.sections:
            self.measure_per_session()
        if "open-loop" in args.sections:
            self.measure_open_loop()
        if "api-down" in args.sections:
            self.measure_api_down()
        if "workers" in args.sections:
            self.measure_workers()
        if "memory" in args.sections:
            self.measure_memory()

    def measure_throughput(self) -> None:
        """Target 1 (CPU per message against naive) and hybrid against direct."""
        modes = [m for m in MODES if m in self.args.modes]
        for latency in self.latencies:
            self.log(f"throughput, API at {latency * 1000:.0f} ms")
            cases = [Case("bare", "bare"), Case("naive", "naive"), *self.bridge_cases(modes)]
            self.rounds(cases, latency)

    def measure_per_session(self) -> None:
        """Target 2: one message per connection, as most legacy apps send."""
        self.log("one message per connection, API at 0 ms")
        spec = replace(self.spec, per_session=1)
        cases = [Case("naive 1/conn", "naive"), *self.bridge_cases(["direct"], " 1/conn")]
        self.rounds(cases, 0.0, spec)

    def measure_open_loop(self) -> None:
        """Target 3: DATA-reply latency at a fixed arrival rate, half the naive
        bridge's saturation rate, API at 50 ms."""
        latency = OPEN_LOOP_LATENCY_MS / 1000
        if self.open_rate is None:
            # Saturation: closed loop with enough clients that the core, not the
            # clients' waiting, is the limit (server CPU near 1.0).
            spec = replace(self.spec, connections=SATURATING_CLIENTS)
            runs = min(self.args.runs, 3)
            self.log(f"naive saturation, {SATURATING_CLIENTS} clients, API at 50 ms")
            self.rounds([Case("naive saturated", "naive")], latency, spec, runs=runs)
            row = self.rows[("naive saturated", OPEN_LOOP_LATENCY_MS)]
            saturation = row.median("rate")
            self.open_rate = max(1.0, round(saturation / 2))
            self.open_rate_note = (
                f"half the naive bridge's saturation rate, {saturation:.0f} msgs/s "
                f"({SATURATING_CLIENTS} closed-loop clients, API at 50 ms, "
                f"server CPU {row.median('server_cpu'):.2f})"
            )
        rate = self.open_rate
        count = min(self.args.count, max(1, int(rate * self.args.duration)))
        spec = replace(
            self.spec,
            connections=OPEN_LOOP_SESSIONS,
            open_rate=rate,
            count=count,
            duration=self.args.duration,
        )
        self.log(f"open loop at {rate:.0f} msgs/s, API at 50 ms ({self.open_rate_note})")
        cases = [Case("naive open", "naive"), *self.bridge_cases(["direct"], " open")]
        self.rounds(cases, latency, spec)

    def measure_api_down(self) -> None:
        """Target 4: queue mode accepts (and fsyncs) while the API refuses every
        call (the breaker opens during the warm-up, the workers pause)."""
        if "queue" in self.skipped:
            return
        self.log("queue mode with the API down")
        cases = [
            Case("bare (api-down)", "bare"),
            *self.bridge_cases(["queue"], " down", api_down=True),
        ]
        self.rounds(cases, 0.0)

    def measure_workers(self) -> None:
        if not harness.serve_accepts_workers():
            self.skipped["workers"] = "`serve --workers` is not implemented yet"
            self.log(f"  skipping workers: {self.skipped['workers']}")
            return
        cpus = harness.all_cpus()
        latency = self.latencies[0]
        # Its own sandbox, unpinned like everything else here: all share all cores.
        sandbox = harness.start_sandbox(latency, self.workdir, None)
        try:
            for round_ in range(self.args.runs):
                for workers in (1, self.args.workers):
                    sample = self.one_run(
                        "bridge",
                        latency,
                        workers=workers,
                        server_cpus=cpus,
                        load_cpus=cpus,
                        sandbox=sandbox,
                    )
                    self.record(f"workers={workers}", latency, sample, round_)
        finally:
            sandbox.stop()

    def measure_memory(self) -> None:
        sandbox = self.sandbox(0.0)

        def fresh_bridge() -> harness.Proc:
            # Each measurement starts its own daemon, so one's peak never hides in the other's.
            return harness.start_server(
                "bridge",
                api_url=sandbox.url,
                workdir=self.workdir,
                cpus=self.server_cpus,
                tree=self.args.bridge_tree,
            )

        for i in range(min(self.args.runs, 3)):
            server = fresh_bridge()
            try:
                self.idle.append(harness.idle_connections(server, self.args.idle, self.load_cpus))
            finally:
                server.stop()
            self.log(f"  round {i + 1}  idle {self.args.idle}: {self.idle[-1]['rss_mb']:.1f} MB")
            server = fresh_bridge()
            try:
                self.big.append(harness.big_message(server, self.args.big, self.load_cpus))
            finally:
                server.stop()
            big = self.big[-1]
            self.log(f"  round {i + 1}  big message: +{big['peak_over_size']:.2f}x its size")

    def close(self) -> None:
        for sandbox in self.sandboxes.values():
            sandbox.stop()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ report

    def report(self) -> tuple[str, list[Target]]:
        lines = []
        header = (
            f"{'server':<18} {'API':>5} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU ms/msg':>10} {'srv CPU':>7} {'other':>5} {'peak RSS':>8} "
            f"{'API CPU':>7} {'load CPU':>8} {'runs':>4} {'errors':>6}"
        )
        lines += [header, "-" * len(header)]
        for (name, lat), row in self.rows.items():
            api = "-" if name.startswith("bare") or name.endswith(" down") else f"{lat}ms"
            lines.append(
                f"{name:<18} {api:>5} {row.median('rate'):8.0f} {row.median('p50_ms'):7.1f} "
                f"{row.median('p99_ms'):7.1f} {row.median('cpu_ms_per_msg'):10.2f} "
                f"{row.median('server_cpu'):7.2f} {row.median('others_cpu'):5.2f} "
                f"{row.median('peak_rss_mb'):6.1f}MB "
                f"{row.median('sandbox_cpu'):7.2f} {row.median('loadgen_cpu'):8.2f} "
                f"{len(row.samples):>4} {row.errors:>6}"
            )
            if name.startswith("queue") and "pace" in (row.samples[0].extra if row.samples else {}):
                lines.append(
                    f"{'':<18} {'':>5} delivery pace {row.extra('pace'):.2f} of the accept rate"
                    f" (backlog drained {row.extra('drain_s'):.2f} s after the window)"
                )
            if name.endswith(" open"):
                lines.append(
                    f"{'':<18} {'':>5} open loop at {row.extra('offered_rate'):.0f}/s: p50/p99"
                    " above are the DATA reply's; from the scheduled arrival: "
                    f"{row.extra('sched_p50_ms'):.1f} / {row.extra('sched_p99_ms'):.1f} ms"
                )
        for what, reason in self.skipped.items():
            lines.append(f"{what:<18} skipped: {reason}")
        if self.rows:
            lines.append(
                "(srv CPU / API CPU / load CPU: cores used by the server, the sandbox API and"
                " the load generator\n (API and load well below 1: not the bottleneck); other:"
                " cores used meanwhile by every other process\n on the machine, i.e. the noise;"
                " every figure is the median of its runs)"
            )
        if self.idle:
            rss = statistics.median(r["rss_mb"] for r in self.idle)
            opened = statistics.median(r["open"] for r in self.idle)
            lines.append(f"idle: {opened:.0f} idle sessions open -> smtp-bridge RSS {rss:.1f} MB")
        if self.big:
            ratio = statistics.median(r["peak_over_size"] for r in self.big)
            peak = statistics.median(r["peak_rss_mb"] for r in self.big)
            before = statistics.median(r["rss_before_mb"] for r in self.big)
            lines.append(
                f"big: {self.args.big / 2**20:.0f} MiB message -> RSS {before:.1f} MB before,"
                f" peak {peak:.1f} MB: +{ratio:.2f}x its size"
            )
        return "\n".join(lines), self.targets()

    def row(self, name: str, lat: int = 0) -> Row | None:
        row = self.rows.get((name, lat))
        return row if row and row.samples else None

    def targets(self) -> list[Target]:
        """Issue 15's targets 1-5, and 6 (the same on --store-url) when given."""
        out = self.store_targets("")
        out += self.shared_targets()
        if self.args.baseline_tree:
            out += [
                (f"before/{name}", figure, ok, note)
                for name, figure, ok, note in self.store_targets(BASE)
            ]
        if self.args.store_url:
            out += [
                (f"6/{name}", figure, ok, note) for name, figure, ok, note in self.store_targets(PG)
            ]
            out += self.postgres_targets()
        for what in self.skipped:
            out.append((f"{what}", "-", None, f"skipped: {self.skipped[what]}"))
        return out

    def store_targets(self, pg: str) -> list[Target]:
        """Targets 1-4 for the bridge on one store (SQLite, or PG = --store-url)."""
        out: list[Target] = []
        naive, direct = self.row("naive"), self.row(f"direct{pg}")
        if naive and direct:
            ratio = direct.median("cpu_ms_per_msg") / max(naive.median("cpu_ms_per_msg"), 1e-9)
            runs = min(len(naive.samples), len(direct.samples))
            note = (
                f"direct {direct.median('cpu_ms_per_msg'):.2f} vs naive "
                f"{naive.median('cpu_ms_per_msg'):.2f} CPU ms/msg, {runs} interleaved rounds"
                f"{'' if runs >= 8 else ' (the target asks for 8 or more)'}; stretch 0.67x: "
                f"{'met' if ratio <= 0.67 else 'not met'}"
            )
            out.append(
                ("1 direct CPU/msg <= 0.75x naive @0ms", f"{ratio:.2f}x", ratio <= 0.75, note)
            )
        naive, direct = self.row("naive 1/conn"), self.row(f"direct{pg} 1/conn")
        if naive and direct:
            ratio = direct.median("rate") / max(naive.median("rate"), 1e-9)
            note = (
                f"direct {direct.median('rate'):.0f} vs naive {naive.median('rate'):.0f} msgs/s;"
                f" CPU ms/msg {direct.median('cpu_ms_per_msg'):.2f} vs "
                f"{naive.median('cpu_ms_per_msg'):.2f}"
            )
            out.append(
                ("2 --per-session 1: direct >= 1.0x naive", f"{ratio:.2f}x", ratio >= 1.0, note)
            )
        lat = OPEN_LOOP_LATENCY_MS
        naive, direct = self.row("naive open", lat), self.row(f"direct{pg} open", lat)
        if direct:
            p50 = direct.median("p50_ms") - lat
            p99 = direct.median("p99_ms") - lat
            note = f"at {direct.extra('offered_rate'):.0f} msgs/s ({self.open_rate_note})"
            if naive:
                note += (
                    f"; naive +{naive.median('p50_ms') - lat:.1f} / "
                    f"+{naive.median('p99_ms') - lat:.1f} ms"
                )
            errors = direct.errors
            if errors:
                note += f"; {errors} errors"
            out.append(
                (
                    "3 open loop @50ms: DATA reply - 50 ms <= 3 / 20 ms (p50/p99)",
                    f"+{p50:.1f}/+{p99:.1f}",
                    p50 <= 3 and p99 <= 20 and not errors,
                    note,
                )
            )
        bare, queue = self.row("bare (api-down)"), self.row(f"queue{pg} down")
        if bare and queue:
            ratio = queue.median("rate") / max(bare.median("rate"), 1e-9)
            note = (
                f"queue {queue.median('rate'):.0f} vs bare {bare.median('rate'):.0f} msgs/s, "
                f"API refusing every call (breaker open, workers paused); "
                f"{queue.median('cpu_ms_per_msg'):.2f} CPU ms/msg"
            )
            out.append(
                ("4 queue accept, API down >= 0.5x bare", f"{ratio:.2f}x", ratio >= 0.5, note)
            )
        direct, hybrid = self.row(f"direct{pg}"), self.row(f"hybrid{pg}")
        if direct and hybrid:
            ratio = hybrid.median("rate") / max(direct.median("rate"), 1e-9)
            cpu = hybrid.median("cpu_ms_per_msg") / max(direct.median("cpu_ms_per_msg"), 1e-9)
            note = (
                f"hybrid {hybrid.median('rate'):.0f} vs direct {direct.median('rate'):.0f} msgs/s"
                f" @0ms; CPU ms/msg {cpu:.2f}x direct's"
            )
            out.append(("5 hybrid within 5% of direct", f"{ratio:.2f}x", ratio >= 0.95, note))
        return out

    def postgres_targets(self) -> list[Target]:
        """Issue 10's: the bridge on PostgreSQL beside itself on SQLite, same rounds."""
        out: list[Target] = []
        wanted = (("direct", 0.8, "msgs/s"), ("queue", 0.6, "accept rate"))
        for mode, floor, what in wanted:
            sqlite, pg = self.row(mode), self.row(f"{mode}{PG}")
            if not (sqlite and pg):
                continue
            ratio = pg.median("rate") / max(sqlite.median("rate"), 1e-9)
            note = (
                f"{mode}-pg {pg.median('rate'):.0f} vs {mode} {sqlite.median('rate'):.0f} msgs/s;"
                f" CPU ms/msg {pg.median('cpu_ms_per_msg'):.2f} vs "
                f"{sqlite.median('cpu_ms_per_msg'):.2f}"
            )
            name = f"10/ {mode} on PostgreSQL >= {floor}x its {what} on SQLite"
            out.append((name, f"{ratio:.2f}x", ratio >= floor, note))
        return out

    def shared_targets(self) -> list[Target]:
        """Target 5's memory figures (the store makes no difference to them)."""
        out: list[Target] = []
        if self.idle:
            rss = statistics.median(r["rss_mb"] for r in self.idle)
            opened = statistics.median(r["open"] for r in self.idle)
            out.append(
                (
                    f"5 {self.args.idle} idle connections <= 80 MB RSS",
                    f"{rss:.1f} MB",
                    rss <= 80 and opened >= self.args.idle,
                    f"{opened:.0f} opened",
                )
            )
        if self.big:
            ratio = statistics.median(r["peak_over_size"] for r in self.big)
            out.append(
                (
                    f"5 {self.args.big / 2**20:.0f} MiB message peak <= 4x its size",
                    f"{ratio:.2f}x",
                    ratio <= 4,
                    "peak RSS minus RSS before, over the size",
                )
            )
        return out


def environment() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=harness.ROOT,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "smtp_bridge"],
        capture_output=True,
        text=True,
        check=False,
        cwd=harness.ROOT,
    ).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"smtp-bridge {commit}{' (+ local changes)' if dirty else ''}; Python "
        f"{platform.python_version()}; {os.cpu_count()} cores; load average {load}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, small counts")
    parser.add_argument("--runs", type=int, help="interleaved rounds per figure (median); 8")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--per-session", type=int, default=10, help="messages per connection")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    parser.add_argument("--size", type=int, default=2048, help="message size, bytes")
    parser.add_argument("--duration", type=float, help="seconds per measured window (5)")
    parser.add_argument("--count", type=int, help="messages per window, at most (50000)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before a window (1)")
    parser.add_argument(
        "--latency",
        type=int,
        nargs="+",
        help="throughput section: added API latencies in ms (default 0)",
    )
    parser.add_argument(
        "--open-rate",
        type=float,
        help="open loop: arrivals a second (default: half the naive bridge's saturation rate)",
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run every bridge row from this checkout, interleaved (before/after)",
    )
    parser.add_argument(
        "--store-url",
        help="also run the bridge rows with this delivery.store (postgresql://...): target 6",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workers", type=int, default=2, help="serve --workers N to compare")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(DEFAULT_SECTIONS),
        choices=SECTIONS,
        help=f"what to measure (default: {' '.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to hold")
    parser.add_argument("--big", type=int, default=10 * 2**20 - 4096, help="big message bytes")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    parser.add_argument("--keep", action="store_true", help="keep the logs and state stores")
    parser.add_argument(
        "--bridge-tree",
        type=Path,
        help="benchmark the smtp_bridge package in this directory (another checkout)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.runs = args.runs or (1 if quick else 8)
    args.duration = args.duration or (1.5 if quick else 5.0)
    args.count = args.count or (3000 if quick else 50_000)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 1.0)
    args.latency = args.latency or [0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    env_before = environment()
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()
    table, targets = bench.report()
    print(f"\n{env_before}")
    if args.bridge_tree:
        print(f"smtp-bridge run from {args.bridge_tree}")
    print(
        f"load: {args.connections} connections, {args.per_session} messages per session, "
        f"{args.rcpts} recipient(s), {args.size} B messages; {args.duration:g} s windows "
        f"(at most {args.count} messages) after {args.warmup:g} s warm-up; median of "
        f"{args.runs} interleaved round(s); server on cores {sorted(bench.server_cpus)}, "
        f"load generator and sandbox on {sorted(bench.load_cpus)}\n"
    )
    print(table)
    print(
        "\ntargets (issue 15; 6/ = the same with --store-url; before/ = --baseline-tree's"
        " rows, same run; 10/ = issue 10's, PostgreSQL beside SQLite):"
    )
    for name, figure, passed, note in targets:
        verdict = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        print(f"  {verdict}  {name:<58} {figure:>11}  {note}")
    print(
        f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
        f" took {time.monotonic() - started:.0f} s"
    )
    if args.json:
        doc: dict[str, Any] = {
            "environment": env_before,
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": {
                f"{n}@{lat}ms": [asdict(s) for s in r.samples] for (n, lat), r in bench.rows.items()
            },
            "idle": bench.idle,
            "big": bench.big,
            "skipped": bench.skipped,
            "targets": [list(t) for t in targets],
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
