"""SMTP load generator: N connections on raw asyncio sockets, bounded in count and time.

Run by ``run.py`` as its own process, pinned to its own core. Protocol on
stdin/stdout, so the harness can sample the server's CPU exactly around the
measured window:

1. warm up for ``--warmup`` seconds (not measured), then every connection
   pauses before its next message and ``READY`` is printed;
2. on ``GO`` from stdin the measured window starts; it ends when ``--count``
   messages are done or ``--duration`` seconds have passed, whichever is first;
3. ``END {json}`` is printed with the figures of the window, then the
   connections QUIT.

Latency is measured from sending MAIL FROM to reading the reply to the end of
DATA. A connection sends ``--per-session`` messages, then QUITs and
reconnects (connection setup is part of the load). Each message has its own
Message-ID, so a server that deduplicates retries never sees one.

``--idle N`` instead opens N connections, says EHLO on each, prints
``READY {json}``, waits for ``GO`` and closes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

FILLER = (
    "Dear customer, your invoice for this month is ready. Thank you for your business "
    "and for choosing us; reply to this message if anything looks wrong.\r\n"
)


def build_message(size: int, seq_marker: str = "@@ID@@") -> bytes:
    """A realistic message of about ``size`` bytes, ending with the DATA terminator.

    Up to 64 KiB: a text/plain body. Larger: multipart with a short text part and
    a base64 attachment (a PDF invoice, the usual big message) filling the rest.
    ``seq_marker`` is replaced per message by a unique Message-ID.
    """
    head = (
        "From: Billing <billing@example.com>\r\n"
        "To: Customer <customer@example.org>\r\n"
        "Subject: Your invoice is ready\r\n"
        f"Message-ID: <{seq_marker}@loadgen.bench>\r\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if size <= 64 * 1024:
        head += "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        body = ""
        while len(head) + len(body) + len(FILLER) <= size:
            body += FILLER
        body += "x" * max(0, size - len(head) - len(body) - 2) + "\r\n"
        text = head + body
    else:
        boundary = "bench-boundary-0123456789"
        head += f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        part1 = (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{FILLER}\r\n"
            f"--{boundary}\r\nContent-Type: application/pdf\r\n"
            'Content-Disposition: attachment; filename="invoice.pdf"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n"
        )
        tail = f"\r\n--{boundary}--\r\n"
        room = size - len(head) - len(part1) - len(tail)
        raw = os.urandom(max(0, room * 3 // 4))
        encoded = base64.encodebytes(raw).decode().replace("\n", "\r\n")[: max(0, room)]
        text = head + part1 + encoded.rstrip("\r\n") + tail
    # No line of the filler starts with "." so no dot-stuffing is needed.
    return text.encode() + b".\r\n"


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    scheduled: list[float] = field(default_factory=list)  # open loop: arrival to DATA reply
    replies: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    last_reply: float = 0.0

    def reply(self, code: int) -> None:
        self.replies[str(code)] = self.replies.get(str(code), 0) + 1

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.template = build_message(args.size)
        self.go = asyncio.Event()
        self.measuring = False
        self.stopping = False
        self.started = 0  # messages begun in the measured window
        self.warm_until = 0.0
        self.go_at = 0.0
        self.deadline = 0.0
        self.stats = Stats()
        self.paused = 0
        self.all_paused = asyncio.Event()
        self.seq = 0
        self.rcpts = [f"rcpt{i}@example.org" for i in range(args.rcpts)]

    def next_message(self, conn: int) -> bytes:
        self.seq += 1
        marker = f"{os.getpid()}.{conn}.{self.seq}.{time.monotonic_ns()}"
        return self.template.replace(b"@@ID@@", marker.encode(), 1)

    async def before_message(self) -> bool:
        """Whether to send another message; pauses at the warm-up/measure boundary."""
        if self.stopping:
            return False
        if not self.measuring:
            if time.perf_counter() < self.warm_until:
                return True
            self.paused += 1
            if self.paused == self.args.connections:
                self.all_paused.set()
            await self.go.wait()
        if self.started >= self.args.count or time.perf_counter() >= self.deadline:
            self.stopping = True
            return False
        self.started += 1
        return True

    async def connection(self, conn: int) -> None:
        args = self.args
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
            except OSError:
                self.stats.error("connect")
                await asyncio.sleep(0.05)
                continue
            try:
                if await read_reply(reader) != 220:
                    self.stats.error("banner")
                    continue
                writer.write(b"EHLO loadgen.bench\r\n")
                if await read_reply(reader) != 250:
                    self.stats.error("ehlo")
                    continue
                for _ in range(args.per_session):
                    if not await self.before_message():
                        break
                    await self.one_message(conn, reader, writer)
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.stats.error(type(exc).__name__)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def one_message(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        due: float | None = None,
        measured: bool | None = None,
    ) -> None:
        """One transaction. Closed loop: latency from MAIL FROM to the DATA reply.
        Open loop (``due``, the scheduled arrival): latency of the DATA reply alone,
        and from ``due`` to that reply."""
        measured = self.measuring if measured is None else measured
        content = self.next_message(conn)
        started = time.perf_counter()
        writer.write(b"MAIL FROM:<app@example.com>\r\n")
        code = await read_reply(reader)
        if code != 250:
            return await self.failed(f"MAIL {code}", reader, writer, measured)
        accepted = 0
        for rcpt in self.rcpts:
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            code = await read_reply(reader)
            accepted += code == 250
            if code != 250 and measured:
                self.stats.error(f"RCPT {code}")
        if not accepted:
            return await self.failed("no RCPT accepted", reader, writer, measured)
        writer.write(b"DATA\r\n")
        code = await read_reply(reader)
        if code != 354:
            return await self.failed(f"DATA {code}", reader, writer, measured)
        if due is not None:
            started = time.perf_counter()
        writer.write(content)
        code = await read_reply(reader)
        done = time.perf_counter()
        if measured:
            self.stats.reply(code)
            self.stats.last_reply = done
            if code == 250:
                self.stats.ok += 1
                self.stats.latencies.append(done - started)
                if due is not None:
                    self.stats.scheduled.append(done - due)

    async def failed(
        self, what: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, measured: bool
    ) -> None:
        if measured:
            self.stats.error(what)
        writer.write(b"RSET\r\n")
        await read_reply(reader)

    async def run(self) -> dict[str, Any]:
        args = self.args
        self.warm_until = time.perf_counter() + args.warmup
        tasks = [asyncio.create_task(self.connection(i)) for i in range(args.connections)]
        await self.all_paused.wait()
        print("READY", flush=True)
        await read_stdin_line()
        cpu0 = _cpu()
        self.measuring = True
        self.go_at = time.perf_counter()
        self.deadline = self.go_at + args.duration
        self.go.set()
        await asyncio.gather(*tasks)
        return self.figures(self.stats.last_reply or time.perf_counter(), cpu0)

    def figures(self, ended: float, cpu0: float) -> dict[str, Any]:
        """The window's figures, from its start (``go_at``) to ``ended``."""
        elapsed = max(ended - self.go_at, 1e-9)
        lat = sorted(self.stats.latencies)
        return {
            "ok": self.stats.ok,
            "replies": self.stats.replies,
            "errors": self.stats.errors,
            "elapsed": elapsed,
            "rate": self.stats.ok / elapsed,
            "p50_ms": _percentile(lat, 50) * 1000,
            "p99_ms": _percentile(lat, 99) * 1000,
            "loadgen_cpu": (_cpu() - cpu0) / elapsed,
        }


class OpenLoad(Load):
    """Open loop: arrivals on a fixed schedule, carried by a pool of sessions."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.arrivals: asyncio.Queue[tuple[float, bool] | None] = asyncio.Queue()

    async def schedule(self, seconds: float, count: int, measured: bool) -> None:
        """Queue arrivals every 1/rate s for ``seconds`` (at most ``count``); one that
        fell due while we slept is queued at once, keeping its scheduled time."""
        interval = 1.0 / self.args.open_rate
        start = time.perf_counter()
        for i in range(count):
            due = start + i * interval
            if due - start >= seconds:
                break
            if measured:
                self.started += 1
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            self.arrivals.put_nowait((due, measured))

    async def session(self, conn: int) -> None:
        args = self.args
        done = False
        while not done:
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
            except OSError:
                self.stats.error("connect")
                await asyncio.sleep(0.05)
                continue
            item: tuple[float, bool] | None = None
            try:
                if await read_reply(reader) != 220:
                    self.stats.error("banner")
                    continue
                writer.write(b"EHLO loadgen.bench\r\n")
                if await read_reply(reader) != 250:
                    self.stats.error("ehlo")
                    continue
                for _ in range(args.per_session):
                    item = await self.arrivals.get()
                    if item is None:
                        done = True
                        break
                    due, measured = item
                    await self.one_message(conn, reader, writer, due=due, measured=measured)
                    self.arrivals.task_done()
                    item = None
                writer.write(b"QUIT\r\n")
                await read_reply(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                if item is not None and item[1]:
                    self.stats.error(type(exc).__name__)
            finally:
                if item is not None:  # lost with its session: counted, not retried
                    self.arrivals.task_done()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        self.arrivals.task_done()  # the None that stopped it

    async def run(self) -> dict[str, Any]:
        args = self.args
        tasks = [asyncio.create_task(self.session(i)) for i in range(args.connections)]
        warm = max(1, round(args.warmup * args.open_rate))
        await self.schedule(args.warmup, warm, measured=False)
        await self.arrivals.join()
        print("READY", flush=True)
        await read_stdin_line()
        cpu0 = _cpu()
        self.go_at = time.perf_counter()
        await self.schedule(args.duration, args.count, measured=True)
        await self.arrivals.join()
        ended = self.stats.last_reply or time.perf_counter()
        for _ in tasks:
            self.arrivals.put_nowait(None)
        await asyncio.gather(*tasks)
        sched = sorted(self.stats.scheduled)
        figures = self.figures(ended, cpu0)
        figures["extra"] = {
            "offered_rate": args.open_rate,
            "arrivals": float(self.started),
            "sched_p50_ms": _percentile(sched, 50) * 1000,
            "sched_p99_ms": _percentile(sched, 99) * 1000,
        }
        return figures


async def read_reply(reader: asyncio.StreamReader) -> int:
    """The code of one (possibly multi-line) SMTP reply."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise asyncio.IncompleteReadError(line, None)
        if line[3:4] != b"-":
            return int(line[:3])


async def read_stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(pct / 100 * len(values) + 0.5) - 1))
    return values[index]


async def idle(args: argparse.Namespace) -> None:
    conns: list[asyncio.StreamWriter] = []
    failed = 0

    async def open_one() -> None:
        nonlocal failed
        try:
            reader, writer = await asyncio.open_connection(args.host, args.port)
            if await read_reply(reader) == 220:
                writer.write(b"EHLO loadgen.bench\r\n")
                if await read_reply(reader) == 250:
                    conns.append(writer)
                    return
            writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        failed += 1

    for start in range(0, args.idle, 100):
        await asyncio.gather(*(open_one() for _ in range(min(100, args.idle - start))))
    print("READY " + json.dumps({"open": len(conns), "failed": failed}), flush=True)
    await read_stdin_line()
    for writer in conns:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--per-session", type=int, default=10, help="messages per connection")
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--count", type=int, default=100_000, help="measured messages, at most")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds, at most")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--idle", type=int, default=0, help="open N idle connections instead")
    parser.add_argument(
        "--open-rate", type=float, default=0.0, help="open loop: arrivals a second (0: closed)"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner: Any = uvloop.run if uvloop is not None else asyncio.run
    if args.idle:
        runner(idle(args))
        return
    load = OpenLoad(args) if args.open_rate > 0 else Load(args)
    result = runner(load.run())
    print("END " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
