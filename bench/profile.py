"""Profile one server under the benchmark's load with py-spy; print where its CPU goes.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py                      # smtp-bridge, direct mode
    .venv/bin/python bench/profile.py --mode queue --latency 50
    .venv/bin/python bench/profile.py --server naive --svg naive.svg

Samples only the thread holding the GIL (``py-spy record --gil``): for a Python
server on one core, that is where the core goes. The report groups samples by
the innermost frame that belongs to a known part of the stack (SMTP engine,
parse, API client, store, logging...), then lists the hottest functions. The
raw samples (``--raw``, collapsed stacks) and a flame graph (``--svg``) can be
kept for a closer look.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

#: (part, patterns): a sample belongs to the part of its innermost frame that
#: matches one (frames of no part, the email package's say, count for their caller).
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("message parse", ("parse_message (", "smtp_bridge/message/")),
    ("address parse (_getaddr)", ("._getaddr",)),
    ("API client (httpx + aiohttp)",
     ("smtp_bridge/api.py", "httpx", "aiohttp/", "yarl", "multidict")),
    ("logging", ("log_event", "logging/__init__", "smtp_bridge/logs.py")),
    ("state store", ("smtp_bridge/store/", "sqlite3", "concurrent/futures", "psycopg")),
    ("routing + templating", ("jinja2", "templating.py", "rules.py", "plan_recipient")),
    ("metrics", ("prometheus", "metrics.py")),
    ("queue worker", ("smtp_bridge/worker.py", "smtp_bridge/spool_attempt.py")),
    ("delivery", ("smtp_bridge/delivery.py", "smtp_bridge/copies.py", "smtp_bridge/settle.py",
                  "smtp_bridge/calls.py")),
    ("SMTP engine (aiosmtpd + smtp/)",
     ("aiosmtpd/", "smtp_bridge/smtp/", "asyncio/streams")),
]  # fmt: skip


def report(raw: Path, top: int) -> str:
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        leaves[frames[-1]] += n
        part = "other (event loop, runtime)"
        for frame in reversed(frames):
            found = next((name for name, pats in PARTS if any(p in frame for p in pats)), None)
            if found:
                part = found
                break
        parts[part] += n
    if not total:
        return "no samples"
    lines = [f"{total} samples; by part of the stack:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in parts.most_common()]
    lines.append(f"hottest functions (self time), top {top}:")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in leaves.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["bridge", "naive", "bare"], default="bridge")
    parser.add_argument("--mode", default="direct", choices=["direct", "hybrid", "queue"])
    parser.add_argument("--latency", type=int, default=0, help="API latency, ms")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds sampled")
    parser.add_argument("--per-session", type=int, default=10, help="messages per connection")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--svg", type=Path, help="also write a flame graph here")
    parser.add_argument("--bridge-tree", type=Path, help="the smtp_bridge package to run")
    parser.add_argument("--store-url", help="the bridge's delivery.store (postgresql://...)")
    parser.add_argument("--api-down", action="store_true", help="an API that refuses connections")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="smtp-bridge-profile-"))
    server_cpus, load_cpus = harness.cpu_sets()
    sandbox = harness.start_sandbox(args.latency / 1000, workdir, load_cpus)
    server = harness.start_server(
        args.server,
        api_url=harness.dead_api_url(sandbox.url) if args.api_down else sandbox.url,
        workdir=workdir,
        cpus=server_cpus,
        mode=args.mode,
        tree=args.bridge_tree,
        store_url=args.store_url,
    )
    raw = args.raw or workdir / "samples.txt"
    try:
        record = [spy, "record", "--pid", str(server.pid), "--gil"]
        record += ["--rate", str(args.rate), "--duration", str(int(args.duration))]
        samplers = [subprocess.Popen([*record, "--format", "raw", "--output", str(raw)])]
        if args.svg:
            samplers.append(subprocess.Popen([*record, "--output", str(args.svg)]))
        time.sleep(0.5)
        spec = harness.LoadSpec(duration=args.duration, warmup=0.3, per_session=args.per_session)
        sample = harness.run_load(server, spec, load_cpus, sandbox=sandbox)
        for sampler in samplers:
            sampler.wait(60)
    finally:
        server.stop()
        sandbox.stop()
    print(
        f"{args.server} ({args.mode}, API {args.latency} ms): {sample.rate:.0f} msgs/s,"
        f" {sample.cpu_ms_per_msg:.2f} CPU ms/msg, server CPU {sample.server_cpu:.2f}"
    )
    print(report(raw, args.top))
    shutil.rmtree(workdir, ignore_errors=True)  # logs and state; --raw/--svg live elsewhere
    return 0


if __name__ == "__main__":
    sys.exit(main())
