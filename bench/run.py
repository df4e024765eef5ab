"""smtp-bridge benchmark: the bridge beside its baselines, and the targets it must show.

One command, on loopback, starts and drives each server in its own process:
(a) a bare aiosmtpd server answering 250 (the stack's ceiling), (b) a naive
bridge (stdlib email parse + one aiohttp POST per recipient) and (c)
smtp-bridge in direct, hybrid and queue modes, all against the sandbox API in
a process of its own, with 0 ms and 50 ms of added API latency. Every figure
is the median of ``--runs`` runs (3), each on a freshly started server.

    .venv/bin/python bench/run.py            # the full benchmark (about 6 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke test: 1 run, small counts, < 60 s

Targets (issue 6) are printed as PASS/FAIL next to the figures they read.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import LoadSpec, Proc, Sample

MODES = ("direct", "hybrid", "queue")
SECTIONS = ("throughput", "workers", "memory")


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
    ) -> Sample:
        sandbox = sandbox or self.sandbox(latency)
        server = harness.start_server(
            kind,
            api_url=sandbox.url,
            workdir=self.workdir,
            cpus=server_cpus or self.server_cpus,
            mode=mode,
            workers=workers,
            tree=self.args.bridge_tree,
        )
        try:
            after = self._drain(server) if mode == "queue" and kind == "bridge" else None
            return harness.run_load(
                server,
                spec or self.spec,
                load_cpus or self.load_cpus,
                sandbox=sandbox,
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
            f"  round {round_ + 1}  {name:<10} {key[1]:>3} ms: {sample.rate:7.0f} msgs/s"
            f"  p99 {sample.p99_ms:6.1f} ms  {sample.cpu_ms_per_msg:5.2f} CPU ms/msg"
            f"  server CPU {sample.server_cpu:4.2f}  other {sample.others_cpu:4.2f}"
            f"  errors {sum(sample.errors.values())}"
        )

    def probe_mode(self, mode: str) -> str:
        """'' when smtp-bridge really runs ``mode``, else why its rows are skipped."""
        if not harness.config_accepts_mode(mode, self.workdir):
            return f"delivery.mode: {mode} is refused by the config"
        if mode == "direct":
            return ""
        latency = self.latencies[0]
        server = harness.start_server(
            "bridge",
            api_url=self.sandbox(latency).url,
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
        if "throughput" in args.sections:
            self.measure_throughput()
        if "workers" in args.sections:
            self.measure_workers()
        if "memory" in args.sections:
            self.measure_memory()

    def measure_throughput(self) -> None:
        """Each round runs every server once, so a busy spell on the machine hits all
        of them alike and the medians stay comparable."""
        modes = [m for m in MODES if m in self.args.modes]
        for mode in modes:
            reason = self.probe_mode(mode)
            if reason:
                self.skipped[mode] = reason
                self.log(f"  skipping {mode}: {reason}")
        first = self.latencies[0]
        cases: list[tuple[str, str, float, str]] = [("bare", "bare", first, "direct")]
        for latency in self.latencies:
            cases.append(("naive", "naive", latency, "direct"))
            cases += [(m, "bridge", latency, m) for m in modes if m not in self.skipped]
        for round_ in range(self.args.runs):
            for name, kind, latency, mode in cases:
                self.record(name, latency, self.one_run(kind, latency, mode=mode), round_)
        for latency in self.latencies[1:]:  # the bare server never calls the API
            self.rows[("bare", round(latency * 1000))] = self.rows[("bare", round(first * 1000))]

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
        sandbox = self.sandbox(self.latencies[0])

        def fresh_bridge() -> harness.Proc:
            # Each measurement starts its own daemon, so one's peak never hides in the other's.
            return harness.start_server(
                "bridge",
                api_url=sandbox.url,
                workdir=self.workdir,
                cpus=self.server_cpus,
                tree=self.args.bridge_tree,
            )

        for i in range(self.args.runs):
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

    def report(self) -> tuple[str, list[tuple[str, str, bool | None, str]]]:
        lines = []
        header = (
            f"{'server':<12} {'API':>5} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU ms/msg':>10} {'srv CPU':>7} {'other':>5} {'peak RSS':>8} {'x bare':>6} "
            f"{'x naive':>7} "
            f"{'API CPU':>7} {'load CPU':>8} {'errors':>6}"
        )
        lines += [header, "-" * len(header)]
        for (name, lat), row in self.rows.items():
            if name == "bare" and lat != self.args.latency[0]:
                continue
            bare = self.rows.get(("bare", lat))
            naive = self.rows.get(("naive", lat))
            rate = row.median("rate")
            x_bare = rate / bare.median("rate") if bare and bare.median("rate") else 0
            x_naive = rate / naive.median("rate") if naive and naive.median("rate") else 0
            api = "-" if name == "bare" else f"{lat}ms"
            lines.append(
                f"{name:<12} {api:>5} {rate:8.0f} {row.median('p50_ms'):7.1f} "
                f"{row.median('p99_ms'):7.1f} {row.median('cpu_ms_per_msg'):10.2f} "
                f"{row.median('server_cpu'):7.2f} {row.median('others_cpu'):5.2f} "
                f"{row.median('peak_rss_mb'):6.1f}MB "
                f"{x_bare:6.2f} {(f'{x_naive:7.2f}' if name != 'bare' else '      -')} "
                f"{row.median('sandbox_cpu'):7.2f} {row.median('loadgen_cpu'):8.2f} "
                f"{row.errors:>6}"
            )
            if name == "queue":
                lines.append(
                    f"{'':<12} {'':>5} delivery pace {row.extra('pace'):.2f} of the accept rate"
                    f" (backlog drained {row.extra('drain_s'):.2f} s after the window)"
                )
        for what, reason in self.skipped.items():
            lines.append(f"{what:<12} skipped: {reason}")
        if self.rows:
            lines.append(
                "(srv CPU / API CPU / load CPU: cores used by the server, the sandbox API and"
                " the load generator\n (API and load well below 1: not the bottleneck); other:"
                " cores used meanwhile by every other process\n on the machine, i.e. the noise)"
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

    def targets(self) -> list[tuple[str, str, bool | None, str]]:
        out: list[tuple[str, str, bool | None, str]] = []

        def rate(name: str, lat: int) -> float | None:
            row = self.rows.get((name, lat))
            return row.median("rate") if row and row.samples else None

        for lat in self.args.latency:
            direct, naive, bare = rate("direct", lat), rate("naive", lat), rate("bare", lat)
            if direct is not None and naive:
                ratio = direct / naive
                out.append((f"direct >= 1.0x naive @{lat}ms", f"{ratio:.2f}x", ratio >= 1.0, ""))
            if direct is not None and bare:
                ratio = direct / bare
                note = ""
                bound = self.spec.connections / (lat / 1000) if lat else 0
                if bound and bound < 0.45 * bare:
                    note = (
                        f"unattainable by construction: {self.spec.connections} closed-loop "
                        f"clients x {lat} ms API = at most {bound:.0f} msgs/s (Little's law); "
                        f"direct reaches {direct / bound:.0%} of that bound"
                    )
                out.append((f"direct >= 0.45x bare @{lat}ms", f"{ratio:.2f}x", ratio >= 0.45, note))
            queue = rate("queue", lat)
            if queue is not None and bare:
                ratio = queue / bare
                out.append(
                    (f"queue accept >= 0.5x bare @{lat}ms", f"{ratio:.2f}x", ratio >= 0.5, "")
                )
            for name in ("direct", "hybrid"):
                row = self.rows.get((name, lat))
                if row and row.samples:
                    added = row.median("p99_ms") - lat
                    note = ""
                    if lat == 0:
                        note = (
                            "at 0 ms the clients saturate the server: p99 is mostly queueing "
                            f"({self.spec.connections} clients / {row.median('rate'):.0f} msgs/s "
                            f"= {self.spec.connections / max(row.median('rate'), 1) * 1000:.1f} ms"
                            " mean by Little's law)"
                        )
                    out.append(
                        (
                            f"{name} p99 added over API <= 10 ms @{lat}ms",
                            f"{added:.1f} ms",
                            added <= 10,
                            note,
                        )
                    )
        row = self.rows.get(("queue", 50))
        if row and row.samples:
            pace = row.extra("pace")
            out.append(
                (
                    "queue delivery keeps pace @50ms",
                    f"{pace:.2f}",
                    pace >= 0.9,
                    "delivered/s over accepted/s (window + drain); pass >= 0.90",
                )
            )
        one = rate("workers=1", self.args.latency[0])
        many = rate(f"workers={self.args.workers}", self.args.latency[0])
        if one and many is not None:
            ratio = many / one
            out.append(
                (
                    f"serve --workers {self.args.workers} >= 1.7x one worker",
                    f"{ratio:.2f}x",
                    ratio >= 1.7,
                    f"{os.cpu_count()} cores shared with the load generator and the sandbox",
                )
            )
        if self.idle:
            rss = statistics.median(r["rss_mb"] for r in self.idle)
            opened = statistics.median(r["open"] for r in self.idle)
            out.append(
                (
                    f"{self.args.idle} idle connections <= 80 MB RSS",
                    f"{rss:.1f} MB",
                    rss <= 80 and opened >= self.args.idle,
                    f"{opened:.0f} opened",
                )
            )
        if self.big:
            ratio = statistics.median(r["peak_over_size"] for r in self.big)
            out.append(
                (
                    f"{self.args.big / 2**20:.0f} MiB message peak <= 4x its size",
                    f"{ratio:.2f}x",
                    ratio <= 4,
                    "peak RSS minus RSS before, over the size",
                )
            )
        for what in self.skipped:
            out.append((f"{what}", "-", None, f"skipped: {self.skipped[what]}"))
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
    parser.add_argument("--quick", action="store_true", help="1 run, small counts, < 60 s")
    parser.add_argument("--runs", type=int, help="runs per figure (median); default 3")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--per-session", type=int, default=10, help="messages per connection")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    parser.add_argument("--size", type=int, default=2048, help="message size, bytes")
    parser.add_argument("--duration", type=float, help="seconds per measured window (5)")
    parser.add_argument("--count", type=int, help="messages per window, at most (50000)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before a window (1)")
    parser.add_argument(
        "--latency", type=int, nargs="+", help="added API latencies in ms (default 0 50)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workers", type=int, default=2, help="serve --workers N to compare")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=list(SECTIONS),
        choices=SECTIONS,
        help="what to measure (default: all)",
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
    args.runs = args.runs or (1 if quick else 3)
    args.duration = args.duration or (1.5 if quick else 5.0)
    args.count = args.count or (3000 if quick else 50_000)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 1.0)
    args.latency = args.latency or ([0] if quick else [0, 50])
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
        f"{args.runs} run(s); server on cores {sorted(bench.server_cpus)}, load generator "
        f"and sandbox on {sorted(bench.load_cpus)}\n"
    )
    print(table)
    print("\ntargets (issue 6):")
    for name, figure, passed, note in targets:
        verdict = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        print(f"  {verdict}  {name:<42} {figure:>9}  {note}")
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
