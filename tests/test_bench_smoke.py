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


def test_the_report_prints_figures_and_a_verdict_per_target() -> None:
    args = run.parse_args(["--quick"])
    bench = run.Bench(args)
    try:
        for name, rate in (("bare", 4000.0), ("naive", 1000.0), ("direct", 1500.0)):
            row = run.Row(name, 0)
            row.samples.append(harness.Sample(rate=rate, p50_ms=5, p99_ms=9, ok=100))
            bench.rows[(name, 0)] = row
        bench.idle.append({"open": 1000.0, "rss_mb": 60.0})
        bench.big.append({"peak_over_size": 2.5, "peak_rss_mb": 90.0, "rss_before_mb": 60.0})
        table, targets = bench.report()
    finally:
        bench.close()
    assert "direct" in table and "1500" in table
    verdicts = {name: passed for name, _, passed, _ in targets}
    assert verdicts["direct >= 1.0x naive @0ms"] is True
    assert verdicts["direct >= 0.45x bare @0ms"] is False  # 0.375x
    assert verdicts["1000 idle connections <= 80 MB RSS"] is True
