"""``route``: the dry run, what the bridge would do with a message file, per recipient."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import EXIT_CONFIG, EXIT_OK, fail, load_or_report

__all__ = ["cmd_route"]


def cmd_route(args: argparse.Namespace) -> int:
    """Each recipient's route and API request, or the reply it would get; sends nothing."""
    from ..dryrun import NoRecipients, dry_run

    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        raw = Path(args.message).read_bytes()
    except OSError as exc:
        return fail(f"cannot read {args.message}: {exc.strerror}")
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
        return fail("no recipients: give --rcpt")
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
