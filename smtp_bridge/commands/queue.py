"""``queue list|show|retry|purge``: the spool and dead letters of a config's state store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .common import EXIT_CONFIG, EXIT_OK, fail, load_or_report, run

if TYPE_CHECKING:
    from ..store import QueueAdmin

__all__ = ["cmd_queue"]


def cmd_queue(args: argparse.Namespace) -> int:
    """``queue list|show|retry|purge``: the spool of a config's state store.

    Safe while the daemon runs: with SQLite a second connection to the same file
    (WAL), whose writes wait for the daemon's (busy timeout); with PostgreSQL the
    whole spool of every instance. The daemon sees a retried recipient within a
    second.
    """
    from ..store import open_store

    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG

    async def run_action() -> int:
        store = await open_store(config.delivery, create=False)
        try:
            result: int = await _QUEUE_ACTIONS[args.action](store, args)
            return result
        finally:
            await store.close()

    try:
        return int(run(run_action()))
    except StoreError as exc:
        return fail(str(exc))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _recipient_json(record: Any) -> dict[str, Any]:
    return {
        "rcpt": record.rcpt,
        "state": str(record.state),
        "route": record.route,
        "template_id": record.template_id,
        "attempts": record.attempts,
        "next_attempt": _when(record.next_attempt) if record.next_attempt else None,
        "updated_at": _when(record.updated_at),
        "api_code": record.api_code,
        "reply": record.reply,
        "error": record.error,
    }


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()
) -> str:
    """Columns as wide as their widest cell; the last one is not padded."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for row in (header, *rows):
        cells = [
            str(cell).rjust(width) if i in right else str(cell).ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        cells[-1] = str(row[-1])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


async def _queue_list(store: QueueAdmin, args: argparse.Namespace) -> int:
    from .. import queue_ops

    rows = await queue_ops.list_queue(store, dead=args.dead, limit=args.limit)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "queue_id": m.queue_id,
                        "mail_from": m.mail_from,
                        "subject": m.subject,
                        "received_at": _when(m.received_at),
                        "retryable": m.content is not None,
                        **_recipient_json(r),
                    }
                    for m, r in rows
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if not rows:
        print("No dead letters." if args.dead else "The spool is empty.")
        return EXIT_OK
    header = ("QUEUE ID", "STATE", "TRIES", "DIED" if args.dead else "NEXT TRY", "RECIPIENT")
    table = []
    for message, record in rows:
        moment = record.updated_at if args.dead else record.next_attempt
        reply = record.reply or record.error or "-"
        if args.dead and message.content is None:
            reply += "  (not retryable: content not kept)"
        table.append(
            (message.queue_id, str(record.state), str(record.attempts), _when(moment), record.rcpt)
            + (reply,)
        )
    print(_table((*header, "LAST REPLY"), table, right={2}))
    messages = len({m.queue_id for m, _ in rows})
    what = "dead letters" if args.dead else "recipients in the spool"
    print(f"{len(rows)} {what} ({messages} messages)")
    return EXIT_OK


def _progress(verb: str) -> Callable[[int, int], None] | None:
    """A progress line on a terminal (stderr), redrawn in place; None elsewhere."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{verb} {done}/{total} messages ({done * 100 // max(total, 1)}%)", end=end,
              file=sys.stderr, flush=True)  # fmt: skip

    return show


async def _queue_show(store: QueueAdmin, args: argparse.Namespace) -> int:
    from .. import queue_ops

    found = await queue_ops.show(store, args.queue_id)
    if found is None:
        return fail(f"no message {args.queue_id}")
    message, recipients = found
    if args.json:
        doc = {
            "queue_id": message.queue_id,
            "received_at": _when(message.received_at),
            "mode": message.mode,
            "mail_from": message.mail_from,
            "client": message.client,
            "user": message.user,
            "subject": message.subject,
            "size": message.size,
            "content_kept": message.content is not None,
            "recipients": [_recipient_json(r) for r in recipients],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"queue id:  {message.queue_id}")
    print(f"received:  {_when(message.received_at)}")
    print(f"mode:      {message.mode}")
    print(f"from:      <{message.mail_from}>")
    print(f"client:    {message.client or '-'}")
    print(f"user:      {message.user or '-'}")
    print(f"subject:   {message.subject}")
    print(f"size:      {message.size} bytes")
    print(f"content:   {'kept (spooled)' if message.content is not None else 'not kept'}")
    print("recipients:")
    for r in recipients:
        print(f"  {r.rcpt}: {r.state}, {r.attempts} attempts, route {r.route or '-'}")
        if r.next_attempt is not None and r.state in ("retrying", "unknown"):
            print(f"    next try: {_when(r.next_attempt)}")
        if r.reply:
            print(f"    reply:    {r.reply}")
        if r.error:
            print(f"    detail:   {r.error}")
    return EXIT_OK


async def _queue_retry(store: QueueAdmin, args: argparse.Namespace) -> int:
    from .. import queue_ops

    ids = None if args.all_dead else [args.queue_id]
    result = await queue_ops.retry(
        store, ids, progress=_progress("retried") if ids is None else None
    )
    if result.missing:
        return fail(f"no message {result.missing[0]}")
    if args.json:
        print(json.dumps({"queued": result.queued, "not_retryable": result.stuck}))
        return EXIT_OK
    where = args.queue_id or "dead letters"
    print(f"{where}: {result.queued} recipients due for delivery now")
    if result.stuck:
        print(
            f"{result.stuck} dead letters cannot be retried: their content was not kept"
            " (direct mode)"
        )
    return EXIT_OK


async def _queue_purge(store: QueueAdmin, args: argparse.Namespace) -> int:
    from .. import queue_ops

    if args.queue_id is not None:
        result = await queue_ops.purge(store, [args.queue_id])
        if result.missing:
            return fail(f"no message {args.queue_id}")
        if args.json:
            print(json.dumps({"purged": result.removed}))
        else:
            print(f"{args.queue_id}: purged ({result.removed} recipients)")
        return EXIT_OK
    result = await queue_ops.purge(store, None)
    print(
        json.dumps({"purged": result.removed})
        if args.json
        else f"purged {result.removed} dead letters"
    )
    return EXIT_OK


_QUEUE_ACTIONS = {
    "list": _queue_list,
    "show": _queue_show,
    "retry": _queue_retry,
    "purge": _queue_purge,
}
