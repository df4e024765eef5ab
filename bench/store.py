"""The state store alone: direct mode's two ledger transactions per message.

Runs ``open_message`` (the message and its guard before the call) then
``record_outcomes`` (the outcome after it) for ``--count`` messages, ``--concurrency``
at a time, on each store named, in interleaved rounds, and prints msgs/s and this
process's CPU ms per message (threads included: SQLite's writer) beside each other.
The database server's own CPU is not counted here (it runs elsewhere in production).

    .venv/bin/python bench/store.py --store-url postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from smtp_bridge.outcomes import RecipientState
from smtp_bridge.store import Ledger, MessageRecord, RecipientRecord, StateStore


async def one(store: Ledger, n: int) -> None:
    queue_id = uuid.uuid4().hex[:12]
    message = MessageRecord(
        queue_id=queue_id,
        message_key=f"mid:<{queue_id}@bench>",
        mail_from="app@example.com",
        client="127.0.0.1",
        user="",
        subject=f"Message {n}",
        size=2048,
        received_at=time.time(),
        mode="direct",
        message_id=f"<{queue_id}@bench>",
    )
    rcpt = f"user{n}@example.org"
    admission = await store.open_message(message, [rcpt], lease=60.0)
    assert admission.guards[rcpt].acquired
    done = RecipientRecord(
        queue_id=queue_id,
        rcpt=rcpt,
        state=RecipientState.DELIVERED,
        route="default",
        template_id="E_GENERIC",
        api_code=200,
        reply="250 2.0.0 Ok",
        attempts=1,
    )
    await store.record_outcomes(queue_id, [done], message_key=message.message_key)


async def round_of(url: str, count: int, concurrency: int) -> tuple[float, float]:
    if url.startswith("sqlite:"):
        from smtp_bridge.store.sqlite import SQLiteStore

        store: StateStore = await SQLiteStore.open(Path(url.removeprefix("sqlite://")))
    else:
        from smtp_bridge.store.postgres import PostgresStore

        store = await PostgresStore.open(url)
    try:
        for n in range(20):  # warm the pool and the caches
            await one(store, n)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        queue = iter(range(count))

        async def runner() -> None:
            for n in queue:
                await one(store, n)

        await asyncio.gather(*(runner() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await store.close()
    return count / wall, cpu / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store-url", action="append", default=[], help="a postgresql:// URL")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the event loop (the daemon runs on uvloop)")  # fmt: skip
    args = parser.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"sqlite": f"sqlite:///{Path(tmp) / 'state.db'}"}
        stores.update({f"pg{i or ''}": url for i, url in enumerate(args.store_url)})
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
        for _ in range(args.rounds):
            for name, url in stores.items():
                with asyncio.Runner(loop_factory=loop_factory) as runner:
                    results[name].append(runner.run(round_of(url, args.count, args.concurrency)))
    print(f"{'store':8} {'msgs/s':>8} {'CPU ms/msg':>11}  (median of {args.rounds} rounds)")
    for name, figures in results.items():
        rate = statistics.median(f[0] for f in figures)
        cpu = statistics.median(f[1] for f in figures)
        print(f"{name:8} {rate:8.0f} {cpu:11.3f}")


if __name__ == "__main__":
    main()
