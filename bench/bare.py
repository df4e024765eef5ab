"""(a) The ceiling: a bare aiosmtpd server whose handle_DATA answers 250, nothing else.

Same event loop (uvloop) and the same way of serving as smtp-bridge
(``loop.create_server`` with aiosmtpd's ``SMTP`` as the protocol factory), and a
fixed ``hostname`` so no FQDN lookup is made per connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvloop
from aiosmtpd.smtp import SMTP


class Handler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"


async def main() -> None:
    loop = asyncio.get_running_loop()
    handler = Handler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench.local", loop=loop), "127.0.0.1", 0
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(json.dumps({"event": "listening", "address": f"{host}:{port}"}), file=sys.stderr)
    sys.stderr.flush()
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    uvloop.run(main())
