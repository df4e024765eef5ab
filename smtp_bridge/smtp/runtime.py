"""What one SMTP session works with: the config, router, authenticator and TLS
context of one (re)load, and the address rules drawn from them."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any

from ..auth import Authenticator, Credentials
from ..config import Config
from ..rules import Router
from ..tls import server_context

__all__ = ["IPAddress", "Runtime", "in_networks", "peer_ip", "unmapped"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Runtime:
    """What one session works with; replaced as a whole on reload (SIGHUP)."""

    config: Config
    router: Router
    authenticator: Authenticator
    #: Built from smtp.tls at every (re)load: renewed certificates reach new sessions.
    tls_context: ssl.SSLContext | None = None

    @classmethod
    def build(cls, config: Config) -> Runtime:
        """Raises :class:`~smtp_bridge.errors.TlsError` when the certificate cannot be loaded."""
        credentials = Credentials.from_config(config.smtp.auth.users)
        tls = config.smtp.tls
        context = server_context(tls.cert, tls.key) if tls is not None else None
        return cls(config, Router(config.routes), Authenticator(credentials), context)

    def auth_offered(self, ip: IPAddress | None, tls: bool) -> bool:
        """AUTH is offered when users exist, and over TLS unless the network is trusted."""
        auth = self.config.smtp.auth
        if not auth.users:
            return False
        return tls or not auth.require_tls or self.is_trusted(ip)

    def is_trusted(self, ip: IPAddress | None) -> bool:
        return in_networks(ip, self.config.smtp.trusted_networks)

    def is_proxy(self, ip: IPAddress | None) -> bool:
        """May ``ip`` send a PROXY header (``smtp.proxy_from``)?"""
        return in_networks(ip, self.config.smtp.proxy_from)


def in_networks(
    ip: IPAddress | None, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    return ip is not None and any(ip.version == net.version and ip in net for net in nets)


def peer_ip(peer: Any) -> IPAddress | None:
    """The client's address from a socket's peername; None for anything else."""
    if isinstance(peer, tuple) and peer:
        try:
            return unmapped(ipaddress.ip_address(str(peer[0]).split("%", 1)[0]))
        except ValueError:
            return None
    return None


def unmapped(ip: IPAddress) -> IPAddress:
    """``ip``, an IPv4-mapped IPv6 address as the IPv4 one it stands for."""
    # A dual-stack listener ("[::]:25") sees IPv4 clients as ::ffff:a.b.c.d;
    # trusted_networks, limits and routes are written with the IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
