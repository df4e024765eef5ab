"""The AOTsend-compatible local API: validates like the real one, records, and fails on cue.

``POST /index/api/send_email`` answers the codes of docs/upstream-api.md with the
handbook's messages. Everything it receives is kept (``GET /_sent``, newest
first; the key only as a fingerprint) so a user sees what would have been
sent; ``GET /_wait?received=N`` answers once N requests have come. ``POST
/_script`` queues faults (an API code, an HTTP status, a reset connection, a
hang) for tests and for operators trying failure paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = ["Sandbox", "run_sandbox", "MESSAGES", "SEND_PATH"]

log = logging.getLogger(__name__)

SEND_PATH = "/index/api/send_email"

#: The handbook's "Code Return Comparison" texts.
MESSAGES: dict[int, str] = {
    200: "Request successful",
    40001: "API key cannot be empty",
    40002: "Authentication failed API key error",
    40003: "Template ID incorrect",
    40004: "The recipient's address cannot be empty",
    40005: "The recipient's address format is incorrect",
    40006: "The default reply address reply_to format is incorrect",
    40007: "Insufficient balance",
    40008: "Data format error",
}

_ACTIONS = ("reset", "hang")
_FIELDS = ("app_key", "template_id", "to", "reply_to", "alias", "is_random", "data")

# A bare addr-spec (RFC 5321 4.1.2 Mailbox), deliberately plain: dot-atom local part
# (UTF-8 allowed as with SMTPUTF8), no display name, no comments, no quoted strings.
_LOCAL_RE = re.compile(r"[^\s\"(),.:;<>@\[\\\]]+(?:\.[^\s\"(),.:;<>@\[\\\]]+)*")
_LABEL_RE = re.compile(r"(?!-)[^\W_](?:[\w-]{0,61}[^\W_])?(?<!-)")


#: Request bodies the sandbox accepts, like a provider that takes large messages.
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _valid_address(value: str) -> bool:
    if value.count("@") != 1 or len(value) > 254:
        return False
    local, domain = value.split("@")
    if not local or len(local) > 64 or not _LOCAL_RE.fullmatch(local):
        return False
    if domain.startswith("[") and domain.endswith("]"):  # address literal
        try:
            ipaddress.ip_address(domain[1:-1].removeprefix("IPv6:"))
        except ValueError:
            return False
        return True
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253:
        return False
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return False
    return not labels[-1].isdigit()  # "a@1.2.3.4" is not a domain


def fingerprint(app_key: str) -> str:
    """What /_sent shows instead of a key: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(app_key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class _Script:
    """One scripted behaviour, matched by recipient, used ``times`` times."""

    to: str | None
    times: int
    code: int | None = None
    message: str | None = None
    status: int | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    action: str | None = None

    @classmethod
    def from_json(cls, doc: object) -> _Script:
        if not isinstance(doc, dict):
            raise ValueError("each script entry must be a JSON object")
        unknown = set(doc) - {"to", "times", "code", "message", "status", "body", "headers"}
        unknown -= {"action"}
        if unknown:
            raise ValueError(f"unknown script fields: {', '.join(sorted(unknown))}")
        to = doc.get("to")
        if to is not None and (not isinstance(to, str) or not to):
            raise ValueError("'to' must be a non-empty string")
        times = doc.get("times", 1)
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError("'times' must be an integer >= 1")
        behaviours = [k for k in ("code", "status", "action") if k in doc]
        if len(behaviours) != 1:
            raise ValueError("exactly one of 'code', 'status' or 'action' is required")
        script = cls(to=to.casefold() if to else None, times=times)
        if "code" in doc:
            code, message = doc["code"], doc.get("message")
            if not isinstance(code, int) or isinstance(code, bool):
                raise ValueError("'code' must be an integer")
            if message is not None and not isinstance(message, str):
                raise ValueError("'message' must be a string")
            script.code, script.message = code, message
        elif "status" in doc:
            status, body, headers = doc["status"], doc.get("body", ""), doc.get("headers", {})
            if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 600:
                raise ValueError("'status' must be an HTTP status from 200 to 599")
            if not isinstance(body, str):
                raise ValueError("'body' must be a string")
            if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                raise ValueError("'headers' must be an object of strings")
            script.status, script.body, script.headers = status, body, dict(headers)
        else:
            action = doc["action"]
            if action not in _ACTIONS:
                raise ValueError(f"'action' must be one of {', '.join(_ACTIONS)}")
            script.action = action
        return script


def _text(value: Any) -> str:
    """A form or JSON field as text: absent or null is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@dataclass(slots=True)
class _Fields:
    """The send_email fields as received, before validation."""

    encoding: str
    values: dict[str, Any]

    def text(self, name: str) -> str:
        return _text(self.values.get(name)).strip()


class Sandbox:
    """An AOTsend-compatible API on a local port.

    Any non-empty ``app_key`` and any template id pass unless ``app_key`` /
    ``templates`` are given. ``latency`` delays every answer (for benchmarks);
    ``keep`` bounds the records of ``GET /_sent``.
    """

    def __init__(
        self,
        *,
        app_key: str | None = None,
        templates: Collection[str] | None = None,
        latency: float = 0.0,
        keep: int = 10000,
    ) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0, got {latency!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")
        self._app_key = app_key or None
        self._templates = frozenset(templates) if templates is not None else None
        self._latency = float(latency)
        self._sent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._scripts: list[_Script] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._stopping = asyncio.Event()
        self._received = 0
        self._received_cond = asyncio.Condition()

    def __repr__(self) -> str:
        auth = "key required" if self._app_key else "any key"
        return f"Sandbox(url={self._url!r}, {auth})"

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def url(self) -> str:
        """The send_email URL; only once started."""
        if self._url is None:
            raise RuntimeError("the sandbox is not started")
        return self._url

    @property
    def base_url(self) -> str:
        """``http://host:port`` for the /_sent, /_script and /healthz endpoints."""
        return self.url.removesuffix(SEND_PATH)

    def sent(self) -> list[dict[str, Any]]:
        """Every request received, newest first (the records of ``GET /_sent``)."""
        return list(self._sent)

    async def wait_sent(self, count: int = 1) -> None:
        """Wait until ``count`` requests in all have reached send_email since creation.

        For tests that must know the sandbox has a request (a scripted hang, say)
        without sleeping; ``DELETE /_sent`` does not reset the count.
        """
        async with self._received_cond:
            await self._received_cond.wait_for(lambda: self._received >= count)

    def app(self) -> web.Application:
        # As large as the bridge's biggest message may make a request body
        # (aiohttp's default is 1 MiB; the bridge accepts 10 MiB by default).
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post(SEND_PATH, self._handle_send)
        app.router.add_get("/_sent", self._handle_get_sent)
        app.router.add_get("/_wait", self._handle_wait)
        app.router.add_delete("/_sent", self._handle_delete_sent)
        app.router.add_post("/_script", self._handle_post_script)
        app.router.add_delete("/_script", self._handle_delete_script)
        app.router.add_get("/healthz", self._handle_healthz)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: an ephemeral port) and return :attr:`url`."""
        if self._runner is not None:
            raise RuntimeError("the sandbox is already started")
        self._stopping.clear()
        # handler_cancellation: a "hang" ends when its client goes away.
        runner = web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        bound_host, bound_port = bound[0], bound[1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}{SEND_PATH}"
        return self._url

    async def stop(self) -> None:
        """Stop listening; hanging requests are aborted. Idempotent."""
        runner, self._runner = self._runner, None
        self._url = None
        if runner is None:
            return
        self._stopping.set()
        await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- send_email --------------------------------------------------------------

    async def _read_fields(self, request: web.Request) -> _Fields:
        if request.content_type == "application/json" or request.content_type.endswith("+json"):
            try:
                doc = json.loads(await request.read())
            except ValueError:
                doc = None
            # Like a PHP API reading $_POST: an unreadable body has no fields.
            return _Fields("json", dict(doc) if isinstance(doc, dict) else {})
        form = await request.post()
        return _Fields("form", {k: v for k, v in form.items() if k in _FIELDS})

    def _validate(self, f: _Fields) -> tuple[int, Any]:
        """docs/upstream-api.md checks in the real API's order: (code, parsed data or None)."""
        app_key = f.text("app_key")
        if not app_key:
            return 40001, None
        if self._app_key is not None and not hmac.compare_digest(
            app_key.encode(), self._app_key.encode()
        ):
            return 40002, None
        template_id = f.text("template_id")
        if not template_id or (self._templates is not None and template_id not in self._templates):
            return 40003, None
        to = f.text("to")
        if not to:
            return 40004, None
        if not _valid_address(to):
            return 40005, None
        reply_to = f.text("reply_to")
        if reply_to and not _valid_address(reply_to):
            return 40006, None
        data, ok = self._data(f)
        if not ok:
            return 40008, None
        if not self._is_random_ok(f.values.get("is_random")):
            return 40008, data
        return 200, data

    @staticmethod
    def _data(f: _Fields) -> tuple[Any, bool]:
        raw = f.values.get("data")
        if raw is None or raw == "":
            return None, True
        if f.encoding == "json":
            return (raw, True) if isinstance(raw, dict) else (None, False)
        if not isinstance(raw, str):
            return None, False
        try:
            doc = json.loads(raw)
        except ValueError:
            return None, False
        return (doc, True) if isinstance(doc, dict) else (None, False)

    @staticmethod
    def _is_random_ok(value: Any) -> bool:
        if value is None or value == "":
            return True
        if isinstance(value, bool):
            return False
        return value in (0, 1) if isinstance(value, int) else value in ("0", "1")

    def _match_script(self, to: str) -> _Script | None:
        folded = to.casefold()
        for i, script in enumerate(self._scripts):
            if script.to is None or script.to == folded:
                script.times -= 1
                if script.times == 0:
                    del self._scripts[i]
                return script
        return None

    async def _record(self, request: web.Request, f: _Fields, code: int | None) -> None:
        app_key = f.text("app_key")
        data, _ = self._data(f)
        is_random = f.values.get("is_random")
        self._sent.appendleft(
            {
                "id": next(self._ids),
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "to": f.text("to"),
                "template_id": f.text("template_id"),
                "data": data,
                "alias": f.text("alias") or None,
                "reply_to": f.text("reply_to") or None,
                "is_random": None if is_random in (None, "") else _text(is_random),
                "encoding": f.encoding,
                "code": code,
                "key": fingerprint(app_key) if app_key else None,
                "user_agent": request.headers.get("User-Agent", ""),
            }
        )
        async with self._received_cond:
            self._received += 1
            self._received_cond.notify_all()

    async def _handle_send(self, request: web.Request) -> web.StreamResponse:
        fields = await self._read_fields(request)  # read fully, also before a "reset"
        script = self._match_script(fields.text("to"))
        if script is None:
            code, _ = self._validate(fields)
            await self._record(request, fields, code)
            await self._delay()
            return web.json_response({"code": code, "message": MESSAGES[code]})
        await self._record(request, fields, script.code)
        if script.action == "reset":
            return self._abort(request)
        if script.action == "hang":
            # Ends when the client goes away (handler cancellation) or on stop().
            await self._stopping.wait()
            return self._abort(request)
        await self._delay()
        if script.code is not None:
            message = script.message if script.message is not None else MESSAGES.get(script.code)
            return web.json_response({"code": script.code, "message": message or "Unknown error"})
        assert script.status is not None
        return web.Response(status=script.status, text=script.body, headers=script.headers)

    @staticmethod
    def _abort(request: web.Request) -> web.Response:
        # Drop the TCP connection without an answer; aiohttp then ignores the
        # response below as a premature client disconnection.
        if request.transport is not None:
            request.transport.abort()
        return web.Response()

    async def _delay(self) -> None:
        if self._latency > 0:
            await asyncio.sleep(self._latency)

    # --- inspection and scripting ---------------------------------------------------

    async def _handle_get_sent(self, request: web.Request) -> web.Response:
        records = self.sent()
        to = request.query.get("to")
        if to is not None:
            folded = to.casefold()
            records = [r for r in records if r["to"].casefold() == folded]
        return web.json_response(records)

    async def _handle_wait(self, request: web.Request) -> web.Response:
        """``GET /_wait?received=N&timeout=S``: answer once N requests in all have
        reached send_email (or after S seconds, default 10); the body has the count.

        :meth:`wait_sent` over HTTP, for tests that run the sandbox as a process.
        """
        try:
            count = int(request.query.get("received", "1"))
            timeout = float(request.query.get("timeout", "10"))
        except ValueError:
            return web.json_response({"error": "received and timeout must be numbers"}, status=400)
        if not 0 <= timeout <= 300:
            return web.json_response({"error": "timeout must be 0 to 300 seconds"}, status=400)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_sent(count), timeout)
        return web.json_response({"received": self._received})

    async def _handle_delete_sent(self, request: web.Request) -> web.Response:
        count = len(self._sent)
        self._sent.clear()
        return web.json_response({"deleted": count})

    async def _handle_post_script(self, request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
            entries = doc if isinstance(doc, list) else [doc]
            scripts = [_Script.from_json(entry) for entry in entries]
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self._scripts.extend(scripts)
        return web.json_response({"scripted": len(scripts), "pending": len(self._scripts)})

    async def _handle_delete_script(self, request: web.Request) -> web.Response:
        count = len(self._scripts)
        self._scripts.clear()
        return web.json_response({"deleted": count})

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def script(self, *entries: Mapping[str, Any]) -> None:
        """Queue script entries in-process, as ``POST /_script`` does."""
        self._scripts.extend(_Script.from_json(dict(entry)) for entry in entries)

    def clear_script(self) -> None:
        """Forget every scripted behaviour, as ``DELETE /_script`` does."""
        self._scripts.clear()


async def run_sandbox(
    host: str,
    port: int,
    *,
    app_key: str | None,
    templates: Collection[str] | None,
    latency: float,
) -> None:
    """Serve the sandbox until cancelled (``smtp-bridge sandbox``)."""
    sandbox = Sandbox(app_key=app_key, templates=templates, latency=latency)
    url = await sandbox.start(host, port)
    try:
        log.info(
            "sandbox listening on %s (%s, %s)",
            url,
            "app_key required" if app_key else "any non-empty app_key",
            f"{len(templates)} templates" if templates is not None else "any template",
        )
        await asyncio.Event().wait()
    finally:
        await sandbox.stop()
