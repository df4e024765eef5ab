"""The admin endpoint's guards: who may look, what the browser may load, who may act.

Mail content is hostile and the console can retry and purge mail, so:

* ``admin.token`` (when set) is required for every path, as a bearer token or as
  the HTTP Basic password (any user name), compared in constant time.
* Without a token (loopback only, the config enforces it) the ``Host`` header must
  name an address or ``localhost``: a DNS-rebinding page cannot borrow the browser.
* Every answer carries a Content-Security-Policy that allows nothing from another
  host and no inline script or style, and headers against framing and sniffing.
* Every POST carries the CSRF token the pages embed, and no cross-site browser
  request may act.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["CSP", "Guard"]

#: Nothing from another host, no inline script or style, no plugins, no framing.
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_is_local(host: str) -> bool:
    """The Host header names an address literal or localhost (not a DNS name)."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """The middleware and the CSRF token of one admin endpoint."""

    def __init__(self, token: Callable[[], str | None]) -> None:
        self._token = token
        self._secret = secrets.token_bytes(32)

    @property
    def csrf_token(self) -> str:
        """The token forms carry; new with every process."""
        return hmac.new(self._secret, b"csrf", hashlib.sha256).hexdigest()

    def authorized(self, request: web.Request) -> bool:
        """The request carries the token (or none is configured)."""
        token = self._token()
        if not token:
            return True
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        candidate = ""
        if scheme.lower() == "bearer":
            candidate = value.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            candidate = decoded.partition(":")[2]
        return bool(candidate) and hmac.compare_digest(
            candidate.encode("utf-8"), token.encode("utf-8")
        )

    async def check_csrf(self, request: web.Request) -> None:
        """Raise 403 unless a POST is same-origin and carries the CSRF token."""
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            raise web.HTTPForbidden(text="cross-site request refused\n")
        origin = request.headers.get("Origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="cross-origin request refused\n")
        form = await request.post()
        given = form.get("csrf")
        if not isinstance(given, str) or not hmac.compare_digest(given, self.csrf_token):
            raise web.HTTPForbidden(text="missing or stale form token: reload the page\n")

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate, refuse foreign Host names, and put the headers on every answer."""
        try:
            if not self.authorized(request):
                raise web.HTTPUnauthorized(
                    text="admin.token required\n",
                    headers={"WWW-Authenticate": 'Basic realm="smtp-bridge", charset="UTF-8"'},
                )
            if not self._token() and not _host_is_local(request.host):
                raise web.HTTPMisdirectedRequest(text="use the address, not a host name\n")
            if request.method == "POST":
                await self.check_csrf(request)
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(_HEADERS)
            raise
        response.headers.update(_HEADERS)
        return response
