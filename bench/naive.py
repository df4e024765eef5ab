"""(b) A naive bridge: stdlib email parse, then one aiohttp POST per recipient.

What a competent afternoon's work looks like (about 40 lines of logic), to
compare smtp-bridge with: no routing, no templating, no ledger, no logs. It is
given every advantage the bridge has: uvloop, a shared connection pool, and a
fixed ``hostname``. Usage: ``naive.py API_URL``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from email import policy
from email.parser import BytesParser
from typing import Any

import aiohttp
import uvloop
from aiosmtpd.smtp import SMTP

APP_KEY = "bench-key"


class Handler:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = BytesParser(policy=policy.default).parsebytes(envelope.content)
        body = msg.get_body(preferencelist=("plain", "html"))
        data = {"subject": str(msg["subject"] or ""), "body": body.get_content() if body else ""}
        for rcpt in envelope.rcpt_tos:
            form = {"app_key": APP_KEY, "template_id": "E_GENERIC", "to": rcpt}
            form["data"] = json.dumps(data)
            try:
                async with self.http.post(self.url, data=form) as response:
                    answer = await response.json(content_type=None)
            except (aiohttp.ClientError, ValueError):
                return "451 4.4.1 API unreachable"
            if answer.get("code") != 200:
                return f"451 4.3.0 API answered {answer.get('code')}"
        return "250 2.0.0 Ok"


async def main(url: str) -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        handler = Handler(http, url)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench.local", loop=loop), "127.0.0.1", 0
        )
        host, port = server.sockets[0].getsockname()[:2]
        print(json.dumps({"event": "listening", "address": f"{host}:{port}"}), file=sys.stderr)
        sys.stderr.flush()
        await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
