"""Routing: which route handles a recipient (docs/configuration.md). Pure: no IO.

Two decisions. At RCPT only the envelope is known, so :meth:`Router.at_rcpt`
asks whether *any* route could still match; at DATA :meth:`Router.match`
decides for real with the parsed message. First match wins in both.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .config import MatchConfig, QuotaMatch, RouteConfig
from .message import ParsedMessage
from .patterns import Pattern

__all__ = ["Envelope", "RcptDecision", "RouteMatch", "Router", "envelope_matches"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP session knows about one recipient before DATA."""

    mail_from: str
    rcpt: str
    user: str = ""
    client_ip: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class RcptDecision:
    """``accept``: some route may match; ``reject``: a reject route certainly does;
    ``no_route``: none can (550 5.1.1)."""

    verdict: Literal["accept", "reject", "no_route"]
    route: RouteConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: RouteConfig
    groups: dict[str, str] = field(default_factory=dict)


def _any(patterns: Sequence[Pattern] | None, value: str, groups: dict[str, str]) -> bool:
    """True when the condition is absent or one of its patterns matches ``value``."""
    if patterns is None:
        return True
    for pattern in patterns:
        found = pattern.search(value)
        if found is not None:
            groups.update(found)
            return True
    return False


def _envelope_matches(
    match: MatchConfig | QuotaMatch, envelope: Envelope, groups: dict[str, str]
) -> bool:
    if not _any(match.rcpt, envelope.rcpt, groups):
        return False
    if not _any(match.mail_from, envelope.mail_from, groups):
        return False
    # No AUTH, no user: not even '*' matches an unauthenticated client (as an
    # absent header never matches).
    if match.user is not None and not envelope.user:
        return False
    if not _any(match.user, envelope.user, groups):
        return False
    if match.client is not None:
        ip = envelope.client_ip
        if ip is None or not any(ip.version == net.version and ip in net for net in match.client):
            return False
    return True


def envelope_matches(match: MatchConfig | QuotaMatch, envelope: Envelope) -> bool:
    """True when the envelope conditions of ``match`` (rcpt, mail_from, user, client) hold."""
    return _envelope_matches(match, envelope, {})


def _content_matches(match: MatchConfig, message: ParsedMessage, groups: dict[str, str]) -> bool:
    if not _any(match.subject, message.subject, groups):
        return False
    if not _any(match.body, message.text, groups):
        return False
    for name, patterns in (match.headers or {}).items():
        # An absent header never matches, even a '*' glob: the condition says
        # the header is there.
        values = message.headers.get_all(name)
        if not any(_any(patterns, value, groups) for value in values):
            return False
    return True


class Router:
    """First-match-wins routing over the configured routes."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)

    def at_rcpt(self, envelope: Envelope) -> RcptDecision:
        """Decide what can be decided from the envelope alone."""
        for route in self.routes:
            if not _envelope_matches(route.match, envelope, {}):
                continue
            if route.match.has_content_conditions:
                return RcptDecision("accept")  # may match once the content is known
            if route.action == "reject":
                return RcptDecision("reject", route)
            return RcptDecision("accept", route)
        return RcptDecision("no_route")

    def match(self, envelope: Envelope, message: ParsedMessage) -> RouteMatch | None:
        """The route for one recipient of a received message, with its named groups."""
        for route in self.routes:
            groups: dict[str, str] = {}
            if _envelope_matches(route.match, envelope, groups) and _content_matches(
                route.match, message, groups
            ):
                return RouteMatch(route, groups)
        return None
