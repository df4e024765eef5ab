"""Listening sockets for ``[::]``: IPv6 and IPv4 on one socket (dual stack).

Mail operators expect ``[::]:25`` to take every client, as Postfix does with
``inet_protocols = all``; asyncio's ``create_server`` binds ``::`` IPv6-only.
So the IPv6 wildcard gets its own socket with ``IPV6_V6ONLY`` off (RFC 3493
5.3), unless ``smtp.dual_stack`` is false or ``0.0.0.0`` on the same port is
listed too (that socket takes IPv4 itself). IPv4 clients then arrive as
``::ffff:a.b.c.d``, which the session unmaps (smtp/runtime.py ``peer_ip``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from .config import split_host_port

__all__ = ["ipv6_only", "is_ipv6_wildcard", "listen_socket", "takes_ipv4"]


def is_ipv6_wildcard(host: str) -> bool:
    """True for ``::`` (any IPv6 address), the one address dual stack applies to."""
    try:
        return ipaddress.ip_address(host) == ipaddress.IPv6Address("::")
    except ValueError:
        return False


def ipv6_only(port: int, dual_stack: bool, listen: Iterable[str]) -> bool:
    """``IPV6_V6ONLY`` for a ``[::]:port`` listener among the ``listen`` entries."""
    if not dual_stack:
        return True
    # 0.0.0.0 on the same port holds IPv4 itself: a dual-stack [::] could not bind.
    return port != 0 and any(split_host_port(a) == ("0.0.0.0", port) for a in listen)


def listen_socket(host: str, port: int, *, v6only: bool, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking IPv6 TCP socket for ``loop.create_server(sock=...)``.

    ``v6only=False`` where the system allows it (a kernel with
    ``net.ipv6.bindv6only`` cannot be overridden on some BSDs: it stays IPv6-only,
    which the ``listening`` log line then shows).
    """
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        except OSError:
            if v6only:
                raise
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def takes_ipv4(sock: socket.socket) -> bool:
    """Does this listening socket accept IPv4 clients (an IPv4 or dual-stack socket)?"""
    if sock.family == socket.AF_INET:
        return True
    if sock.family != socket.AF_INET6:
        return False
    return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
