"""The benchmark's building blocks work: every server starts, answers 250, gives figures.

Correctness only, never timing: this machine may be busy, and the targets are
shown by ``bench/run.py``, not asserted here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
harness: Any = importlib.import_module("harness")
run: Any = importlib.import_module("run")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="the benchmark reads /proc (Linux)"
)

SMALL = {"connections": 4, "per_session": 3, "count": 24, "duration": 20.0, "warmup": 0.2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("bench")
    return path


@pytest.fixture(scope="module")
def sandbox(workdir: Path) -> Iterator[Any]:
    proc = harness.start_sandbox(0.0, workdir, None)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("kind", ["bare", "naive", "bridge"])
def test_every_server_answers_250_and_gives_figures(kind: str, sandbox: Any, workdir: Path) -> None:
    server = harness.start_server(kind, api_url=sandbox.url, workdir=workdir, cpus=None)
    try:
        sample = harness.run_load(server, harness.LoadSpec(**SMALL), None, sandbox=sandbox)
    finally:
        server.stop()
    assert sample.errors == {}
    assert sample.replies == {"250": SMALL["count"]}
    assert sample.ok == SMALL["count"]
    assert sample.rate > 0
    assert 0 < sample.p50_ms <= sample.p99_ms
    # /proc counts CPU in ticks (10 ms): a bare server's few messages may cost none.
    assert sample.cpu_ms_per_msg >= 0
    assert sample.peak_rss_mb > 0
    if kind == "bridge":
        delivered = harness.query_state(
            server, "SELECT COUNT(*) FROM recipients WHERE state = 'delivered'"
        )
        assert delivered[0][0] >= SMALL["count"]


def test_idle_connections_and_big_message(sandbox: Any, workdir: Path) -> None:
    server = harness.start_server("bridge", api_url=sandbox.url, workdir=workdir, cpus=None)
    try:
        idle = harness.idle_connections(server, 50, None)
        big = harness.big_message(server, 1024 * 1024, None)
    finally:
        server.stop()
    assert idle["open"] == 50 and idle["failed"] == 0
    assert idle["rss_mb"] > 0
    assert big["ok"] == 6  # five small messages, then the big one, all 250
    assert big["peak_rss_mb"] >= big["rss_before_mb"] > 0


def test_open_loop_mode_keeps_its_schedule_and_reports_data_latency(
    sandbox: Any, workdir: Path
) -> None:
    server = harness.start_server("bare", api_url=sandbox.url, workdir=workdir, cpus=None)
    spec = harness.LoadSpec(
        connections=4, per_session=3, count=20, duration=20.0, warmup=0.1, open_rate=200.0
    )
    try:
        sample = harness.run_load(server, spec, None)
    finally:
        server.stop()
    assert sample.errors == {} and sample.replies == {"250": 20} and sample.ok == 20
    assert sample.extra["arrivals"] == 20 and sample.extra["offered_rate"] == 200.0
    # The DATA reply is one step of the transaction that starts at the arrival.
    assert 0 < sample.p50_ms <= sample.extra["sched_p50_ms"]
    assert sample.p99_ms <= sample.extra["sched_p99_ms"]


def test_queue_mode_accepts_with_the_api_down(sandbox: Any, workdir: Path) -> None:
    dead = harness.dead_api_url(sandbox.url)
    server = harness.start_server("bridge", api_url=dead, workdir=workdir, cpus=None, mode="queue")
    try:
        sample = harness.run_load(server, harness.LoadSpec(**SMALL), None)
        spooled = harness.query_state(
            server, "SELECT COUNT(*), COALESCE(SUM(state = 'delivered'), 0) FROM recipients"
        )
    finally:
        server.stop()
    assert sample.replies == {"250": SMALL["count"]}
    total, delivered = spooled[0]
    assert total >= SMALL["count"] and delivered == 0  # all spooled, none sent


def test_the_report_prints_figures_and_a_verdict_per_target() -> None:
    args = run.parse_args(["--quick"])
    bench = run.Bench(args)
    try:
        figures = {
            ("bare", 0): (4000.0, 0.2),
            ("naive", 0): (1000.0, 0.8),
            ("direct", 0): (1100.0, 0.56),  # 0.70x naive's CPU: PASS
            ("hybrid", 0): (1000.0, 0.6),  # 0.91x direct: FAIL
            ("naive 1/conn", 0): (800.0, 1.0),
            ("direct 1/conn", 0): (700.0, 1.1),  # 0.88x: FAIL
            ("bare (api-down)", 0): (4000.0, 0.2),
            ("queue down", 0): (2100.0, 0.4),  # 0.53x: PASS
        }
        for (name, lat), (rate, cpu) in figures.items():
            row = run.Row(name, lat)
            row.samples.append(
                harness.Sample(rate=rate, p50_ms=5, p99_ms=9, ok=100, cpu_ms_per_msg=cpu)
            )
            bench.rows[(name, lat)] = row
        for name, p50, p99 in (("naive open", 53.2, 64.0), ("direct open", 52.0, 71.0)):
            row = run.Row(name, 50)
            row.samples.append(
                harness.Sample(
                    rate=250, p50_ms=p50, p99_ms=p99, ok=100, extra={"offered_rate": 250}
                )
            )
            bench.rows[(name, 50)] = row
        bench.idle.append({"open": 1000.0, "rss_mb": 60.0})
        bench.big.append({"peak_over_size": 2.5, "peak_rss_mb": 90.0, "rss_before_mb": 60.0})
        table, targets = bench.report()
    finally:
        bench.close()
    assert "direct" in table and "1100" in table
    verdicts = {name: (figure, passed) for name, figure, passed, _ in targets}
    assert verdicts["1 direct CPU/msg <= 0.75x naive @0ms"] == ("0.70x", True)
    assert verdicts["2 --per-session 1: direct >= 1.0x naive"] == ("0.88x", False)
    # +2.0 ms at p50 but +21.0 at p99: FAIL, with both figures shown.
    assert verdicts["3 open loop @50ms: DATA reply - 50 ms <= 3 / 20 ms (p50/p99)"] == (
        "+2.0/+21.0",
        False,
    )
    assert verdicts["4 queue accept, API down >= 0.5x bare"] == ("0.53x", True)
    assert verdicts["5 hybrid within 5% of direct"] == ("0.91x", False)
    assert verdicts["5 1000 idle connections <= 80 MB RSS"] == ("60.0 MB", True)
    assert not any(name.startswith("6/") for name in verdicts)  # no --store-url given
