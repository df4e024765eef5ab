"""The PROXY protocol header (haproxy's proxy-protocol.txt, v1 and v2) that an
allowed load balancer sends before anything else: who the client really is."""

from __future__ import annotations

import asyncio
import ipaddress

from aiosmtpd.proxy_protocol import V2_CMD, ProxyData, get_proxy

from .runtime import IPAddress, unmapped

__all__ = ["read_proxy_header"]


async def read_proxy_header(
    reader: asyncio.StreamReader, proxy: IPAddress | None
) -> tuple[IPAddress | None, ProxyData] | str:
    """The client the header names, and the header; else why there is none.

    A LOCAL header (health checks), an UNKNOWN one or a unix-socket address
    names no client: the proxy itself stands for it.
    """
    try:
        data: ProxyData | None = await get_proxy(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        data = None
    if data is None:
        return "connection closed"
    if not data.valid:
        return str(data.error)
    source = data.src_addr
    if data.command != V2_CMD.LOCAL and isinstance(
        source, ipaddress.IPv4Address | ipaddress.IPv6Address
    ):
        return unmapped(source), data
    return proxy, data
