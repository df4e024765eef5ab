"""The ``smtp-bridge`` command line (docs/cli.md): the parser and the entry point.

The commands themselves live in :mod:`smtp_bridge.commands`, a module per group.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .commands.common import CONFIG_ENV, EXIT_OK
from .commands.config_file import cmd_check_config, cmd_hash_password, cmd_schema
from .commands.queue import cmd_queue
from .commands.route import cmd_route
from .commands.send_test import cmd_send_test
from .commands.serve import cmd_sandbox, cmd_serve
from .config import DEFAULT_CONFIG_PATH

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Every command and option; docs/cli.md and the completion scripts are made from it."""
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


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import completion_script

    print(completion_script(build_parser(), args.shell), end="")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``smtp-bridge`` console script: run the command ``argv`` names; its exit status."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
