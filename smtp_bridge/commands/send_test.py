"""``send-test``: one real call to the configured API, its answer printed as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import EXIT_CONFIG, EXIT_OK, fail, load_or_report, run

__all__ = ["cmd_send_test"]


def cmd_send_test(args: argparse.Namespace) -> int:
    from ..api import ApiClient
    from ..outcomes import ApiRequest

    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    data: Any
    try:
        data = json.loads(args.data) if args.data else {}
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return fail("--data must be a JSON object")

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

    return int(run(send()))
