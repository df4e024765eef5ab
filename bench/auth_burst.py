"""Does a burst of AUTH stall other sessions? NOOP round trips with and without one.

A real daemon (``smtp-bridge serve``) with one AUTH user at the default scrypt
cost. Each round opens a probe session from 127.0.0.1 that sends a NOOP every
``--interval`` and times each round trip. Burst rounds also open 20 connections,
each from its own loopback address (so the lockout never spares a hash), that
send ``AUTH PLAIN`` with a wrong password all at once. Burst and baseline rounds
alternate; the figures are medians over the rounds.

    .venv/bin/python bench/auth_burst.py [--rounds 5] [--bridge-tree DIR]

``--bridge-tree DIR`` runs the ``smtp_bridge`` package of another checkout (the
figures before the change).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness

from smtp_bridge.auth import hash_password

__all__ = ["main"]

PASSWORD = "bench-pa55word"
CONFIG = """\
smtp:
  listen: ["127.0.0.1:0"]
  hostname: bench.local
  auth:
    require_tls: false
    users:
      app: {{password_hash: "{hash}"}}
api:
  url: {api_url}
  app_key: {app_key}
delivery:
  state_dir: {state_dir}
admin:
  listen: null
routes:
  - name: default
    template_id: E_BENCH
"""


async def _probe(host: str, port: int, count: int, interval: float) -> list[float]:
    """NOOP round trips in ms, one every ``interval`` seconds."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()
        writer.write(b"EHLO probe\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        times = []
        for _ in range(count):
            began = time.perf_counter()
            writer.write(b"NOOP\r\n")
            await reader.readline()
            times.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(interval)
        writer.write(b"QUIT\r\n")
        return times
    finally:
        writer.close()


async def _guess(host: str, port: int, source: str, start: asyncio.Event) -> str:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        await reader.readline()
        writer.write(b"EHLO burst\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        await start.wait()
        writer.write(b"AUTH PLAIN " + base64.b64encode(b"\0app\0wrong") + b"\r\n")
        return (await reader.readline()).decode()[:3]
    finally:
        writer.close()


async def _round(
    address: tuple[str, int], burst: int, index: int, count: int, interval: float
) -> tuple[list[float], float, list[str]]:
    host, port = address
    start = asyncio.Event()
    guesses = [
        asyncio.create_task(_guess(host, port, f"127.1.{index % 250}.{i + 1}", start))
        for i in range(burst)
    ]
    probe = asyncio.create_task(_probe(host, port, count, interval))
    await asyncio.sleep(interval)  # the probe is in its session before the burst
    began = time.perf_counter()
    start.set()
    answers = await asyncio.gather(*guesses)
    took = (time.perf_counter() - began) * 1000
    return await probe, took, answers


def _figures(samples: list[list[float]]) -> tuple[float, float, float]:
    """Medians over rounds of: the median, the 95th percentile and the maximum."""
    med = statistics.median(statistics.median(s) for s in samples)
    p95 = statistics.median(sorted(s)[int(len(s) * 0.95) - 1] for s in samples)
    top = statistics.median(max(s) for s in samples)
    return med, p95, top


async def _measure(address: tuple[str, int], rounds: int, count: int, interval: float) -> None:
    quiet: list[list[float]] = []
    loud: list[list[float]] = []
    bursts: list[float] = []
    codes: dict[str, int] = {}
    for index in range(rounds):
        for burst in (0, 20):  # interleaved: the machine's drift hits both alike
            probe, took, answers = await _round(address, burst, index, count, interval)
            (loud if burst else quiet).append(probe)
            if burst:
                bursts.append(took)
                for code in answers:
                    codes[code] = codes.get(code, 0) + 1
    print(f"{'NOOP round trip (ms)':<28}{'median':>8}{'p95':>8}{'max':>8}")
    for name, samples in (("baseline (no burst)", quiet), ("during 20 parallel AUTH", loud)):
        med, p95, top = _figures(samples)
        print(f"{name:<28}{med:8.2f}{p95:8.2f}{top:8.2f}")
    print(f"burst: all 20 replies in {statistics.median(bursts):.0f} ms (median); replies {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=40, help="NOOPs per probe (limit 50)")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between NOOPs")
    parser.add_argument("--bridge-tree", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="auth-burst-"))
    sandbox = harness.start_sandbox(0.0, workdir, None)
    server = None
    try:
        state_dir = workdir / "state"
        config = workdir / "config.yaml"
        config.write_text(
            CONFIG.format(
                hash=hash_password(PASSWORD),
                api_url=sandbox.url,
                app_key=harness.APP_KEY,
                state_dir=state_dir,
            )
        )
        argv = [harness.PYTHON, "-m", "smtp_bridge", "serve", "--config", str(config)]
        cwd = args.bridge_tree or harness.ROOT
        server, found = harness._spawn("bridge", argv, workdir, None, harness._LISTENING, cwd)
        address = (found.group(1), int(found.group(2)))
        print(f"smtp_bridge from {cwd}; {args.rounds} rounds of each, interleaved")
        asyncio.run(_measure(address, args.rounds, args.count, args.interval))
    finally:
        if server is not None:
            server.stop()
        sandbox.stop()


if __name__ == "__main__":
    sys.exit(main())
