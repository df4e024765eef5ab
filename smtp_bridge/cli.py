"""The ``smtp-bridge`` command line (docs/cli.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, json_schema, load_config, parse_config
from .errors import ConfigError, StartupError, StoreError
from .logs import configure_logging, log_event

if TYPE_CHECKING:
    from .store import QueueAdmin

__all__ = ["main"]

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STARTUP = 2

#: ``serve --sandbox`` with no config file: a catch-all route, so a newcomer
#: sees mail flow end to end before writing any YAML.
SANDBOX_CONFIG = """
smtp:
  listen: ["127.0.0.1:2525"]
  hostname: localhost
delivery:
  state_dir: {state_dir}
admin:
  listen: "127.0.0.1:9025"
routes:
  - name: everything
    template_id: "sandbox-template"
    alias: "{{{{ sender.name or 'smtp-bridge' }}}}"
    data:
      subject: "{{{{ subject }}}}"
      body: "{{{{ text }}}}"
"""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "smtp-bridge"


#: Sets the default of ``--config`` (docs/cli.md).
CONFIG_ENV = "SMTP_BRIDGE_CONFIG"


def _config_arg(path: str | None) -> str | None:
    """``--config``, else ``$SMTP_BRIDGE_CONFIG``, else None (the built-in default)."""
    return path or os.environ.get(CONFIG_ENV) or None


def _load(path: str | None, *, sandbox: bool = False) -> Config:
    path = _config_arg(path)
    if path is None and sandbox and not DEFAULT_CONFIG_PATH.exists():
        text = SANDBOX_CONFIG.format(state_dir=json.dumps(str(_default_state_dir())))
        return parse_config(text, filename="<built-in sandbox config>")
    return load_config(path or DEFAULT_CONFIG_PATH)


def _print_errors(error: ConfigError) -> None:
    for issue in error.issues:
        print(issue, file=sys.stderr)


def _log_errors(event: str, errors: Sequence[str]) -> None:
    """``serve``'s start-up errors as log lines (JSON with ``--log-format json``, the
    default): a log collector parsing the daemon's stderr never meets plain text."""
    log = logging.getLogger("smtp_bridge.cli")
    for error in errors:
        log_event(log, event, level=logging.ERROR, error=error)


def cmd_serve(args: argparse.Namespace) -> int:
    from .service import BridgeService, settle_heap

    configure_logging(args.log_format, args.log_level)
    try:
        config = _load(args.config, sandbox=args.sandbox)
    except ConfigError as exc:
        _log_errors("config_error", [str(issue) for issue in exc.issues])
        return EXIT_CONFIG
    given = _config_arg(args.config)
    config_path = (
        Path(given) if given else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    )
    settle_heap()
    if args.workers > 1 or os.environ.get("SMTP_BRIDGE_WORKER"):
        from .supervisor import serve_workers

        return serve_workers(args, config, config_path, _run)
    service = BridgeService(config, config_path=config_path, sandbox=args.sandbox)
    try:
        _run(service.run())
    except StartupError as exc:
        _log_errors("cannot_start", [str(exc)])
        return EXIT_STARTUP
    return EXIT_OK


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_errors(exc)
        return EXIT_CONFIG
    print(f"ok: {_config_arg(args.config) or DEFAULT_CONFIG_PATH}: {len(config.routes)} routes")
    for route in config.routes:
        print(f"  {_describe_route(route)}")
    if config.api.app_key is None:
        print("  warning: api.app_key is not set (only `serve --sandbox` works)")
    return EXIT_OK


def _describe_route(route: Any) -> str:
    conditions = []
    for name, value in route.match:
        if value is None:
            continue
        if name == "headers":
            text = ", ".join(f"{k}={'|'.join(map(str, v))}" for k, v in value.items())
        else:
            text = "|".join(map(str, value))
        conditions.append(f"{name}={text}")
    where = " ".join(conditions) or "(any)"
    if route.action == "relay":
        what = f"template={route.template_id}"
    elif route.action == "reject":
        what = f"reject {route.reply or '(550 5.7.1)'}"
    else:
        what = "drop"
    return f"{route.name}: {where} -> {what}"


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    from .dryrun import NoRecipients, dry_run

    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_errors(exc)
        return EXIT_CONFIG
    try:
        raw = Path(args.message).read_bytes()
    except OSError as exc:
        print(f"smtp-bridge: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = dry_run(
            raw,
            config,
            rcpts=args.rcpt,
            mail_from=args.mail_from,
            user=args.user,
            client=args.client,
        )
    except NoRecipients:
        print("smtp-bridge: no recipients: give --rcpt", file=sys.stderr)
        return EXIT_CONFIG
    status = EXIT_OK
    for result in results:
        print(f"rcpt: {result.rcpt}")
        print(f"  route: {result.route or '(none)'}")
        if result.request is not None:
            print(f"  POST {result.url} ({result.encoding})")
            text = json.dumps(result.request, ensure_ascii=False, indent=2)
            print("  " + text.replace("\n", "\n  "))
        else:
            print(f"  no API call: {result.reply}")
            status = status if result.success else EXIT_CONFIG
    return status


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .config import split_host_port
    from .sandbox import run_sandbox

    configure_logging(args.log_format, args.log_level)
    host, port = split_host_port(args.listen)
    templates = [t for t in (args.templates or "").split(",") if t] or None
    with contextlib.suppress(KeyboardInterrupt):
        _run(
            run_sandbox(host, port, app_key=args.app_key, templates=templates, latency=args.latency)
        )
    return EXIT_OK


def cmd_send_test(args: argparse.Namespace) -> int:
    from .api import ApiClient
    from .outcomes import ApiRequest

    try:
        config = _load(args.config)
        data = json.loads(args.data) if args.data else {}
    except ConfigError as exc:
        _print_errors(exc)
        return EXIT_CONFIG
    except ValueError:
        print("smtp-bridge: --data must be a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(data, dict):
        print("smtp-bridge: --data must be a JSON object", file=sys.stderr)
        return EXIT_CONFIG

    async def send() -> int:
        request = ApiRequest(template_id=args.template, to=args.to, data=data)
        async with ApiClient(
            config.api.url, encoding=config.api.encoding, timeout=config.api.timeout
        ) as client:
            result = await client.send(request, config.app_key())
        print(
            json.dumps(
                {
                    "result": result.kind.value,
                    "code": result.code,
                    "http_status": result.http_status,
                    "message": result.message,
                    "latency_ms": round(result.latency * 1000, 1),
                }
            )
        )
        return EXIT_OK if result.delivered else EXIT_CONFIG

    return int(_run(send()))


def cmd_queue(args: argparse.Namespace) -> int:
    """``queue list|show|retry|purge``: the spool of a config's state store.

    Safe while the daemon runs: with SQLite a second connection to the same file
    (WAL), whose writes wait for the daemon's (busy timeout); with PostgreSQL the
    whole spool of every instance. The daemon sees a retried recipient within a
    second.
    """
    from .store import open_store

    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_errors(exc)
        return EXIT_CONFIG

    async def run() -> int:
        store = await open_store(config.delivery, create=False)
        try:
            result: int = await _QUEUE_ACTIONS[args.action](store, args)
            return result
        finally:
            await store.close()

    try:
        return int(_run(run()))
    except StoreError as exc:
        print(f"smtp-bridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG


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
    from . import queue_ops

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
    from . import queue_ops

    found = await queue_ops.show(store, args.queue_id)
    if found is None:
        print(f"smtp-bridge: no message {args.queue_id}", file=sys.stderr)
        return EXIT_CONFIG
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
    from . import queue_ops

    ids = None if args.all_dead else [args.queue_id]
    result = await queue_ops.retry(
        store, ids, progress=_progress("retried") if ids is None else None
    )
    if result.missing:
        print(f"smtp-bridge: no message {result.missing[0]}", file=sys.stderr)
        return EXIT_CONFIG
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
    from . import queue_ops

    if args.queue_id is not None:
        result = await queue_ops.purge(store, [args.queue_id])
        if result.missing:
            print(f"smtp-bridge: no message {args.queue_id}", file=sys.stderr)
            return EXIT_CONFIG
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


def cmd_hash_password(args: argparse.Namespace) -> int:
    from .auth import hash_password, read_password_from

    try:
        password = read_password_from(sys.stdin, interactive=sys.stdin.isatty())
    except ValueError as exc:
        print(f"smtp-bridge: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-bridge", description="SMTP in, AOTsend template API calls out."
    )
    parser.add_argument("--version", action="version", version=f"smtp-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    # Options may stand before or after a subcommand's own words (docs/cli.md): they are
    # declared on the command and again on each of its actions; there with SUPPRESS,
    # so an action's parser sets them only when they are given to it.
    def with_config(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        p.add_argument(
            "--config",
            "-c",
            default=argparse.SUPPRESS if nested else None,
            help=f"config file (default ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
        )

    def with_json(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
        p.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS if nested else False,
            help="JSON instead of a table",
        )

    def with_logging(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-format", choices=["json", "text"], default="json")
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    with_config(serve)
    with_logging(serve)
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="start the embedded fake API and send to it (no config: console on :9025)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="N worker processes sharing the listen ports (SO_REUSEPORT); default 1",
    )
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check-config", help="validate the config and print the routes")
    with_config(check)
    check.set_defaults(func=cmd_check_config)

    schema = commands.add_parser("schema", help="print the JSON Schema of the config")
    schema.set_defaults(func=cmd_schema)

    route = commands.add_parser("route", help="dry run: the route and API request per recipient")
    with_config(route)
    route.add_argument("message", help="an RFC 5322 message file (.eml)")
    route.add_argument("--rcpt", action="append", help="envelope recipient (repeatable)")
    route.add_argument("--mail-from", help="envelope sender (default: the From address)")
    route.add_argument("--user", default="", help="SMTP AUTH user to assume")
    route.add_argument("--client", default="127.0.0.1", help="client IP to assume")
    route.set_defaults(func=cmd_route)

    sandbox = commands.add_parser("sandbox", help="run the AOTsend-compatible local API")
    sandbox.add_argument("--listen", default="127.0.0.1:8025")
    sandbox.add_argument("--app-key", help="accept only this key (default: any non-empty)")
    sandbox.add_argument("--templates", help="comma-separated template ids (default: any)")
    sandbox.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    with_logging(sandbox)
    sandbox.set_defaults(func=cmd_sandbox)

    send_test = commands.add_parser("send-test", help="one real API call; prints the answer")
    with_config(send_test)
    send_test.add_argument("--to", required=True)
    send_test.add_argument("--template", default="test")
    send_test.add_argument("--data", help="template variables as a JSON object")
    send_test.set_defaults(func=cmd_send_test)

    hash_pw = commands.add_parser("hash-password", help="make a password_hash for smtp.auth.users")
    hash_pw.set_defaults(func=cmd_hash_password)

    queue = commands.add_parser("queue", help="list, show, retry or purge spooled mail")
    with_config(queue)
    with_json(queue)
    actions = queue.add_subparsers(dest="action", required=True)
    q_list = actions.add_parser("list", help="recipients waiting in the spool (or dead letters)")
    q_list.add_argument("--dead", action="store_true", help="list dead letters instead")
    q_list.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    q_show = actions.add_parser("show", help="one message and its recipients")
    q_show.add_argument("queue_id")
    q_retry = actions.add_parser("retry", help="send dead letters (or a waiting message) now")
    which = q_retry.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", nargs="?", help="the message's queue id")
    which.add_argument("--all-dead", action="store_true", help="every dead letter")
    q_purge = actions.add_parser("purge", help="delete a message, or every dead letter")
    which = q_purge.add_mutually_exclusive_group(required=True)
    which.add_argument("queue_id", nargs="?", help="the message's queue id")
    which.add_argument("--dead", action="store_true", help="every dead letter")
    for action in (q_list, q_show, q_retry, q_purge):
        with_config(action, nested=True)
        with_json(action, nested=True)
    queue.set_defaults(func=cmd_queue)

    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)
    return parser


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import completion_script

    print(completion_script(build_parser(), args.shell), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
