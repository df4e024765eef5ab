"""The operator's web console (docs/README.md (the console)), served by the admin endpoint.

Server-rendered Jinja2 pages with autoescaping, a small stylesheet and script
shipped in the package, no inline script or style (the CSP forbids them), and
everything readable with JavaScript off. It reads the state store's history
(:mod:`smtp_bridge.store.history`) and spool, and acts through
:mod:`smtp_bridge.queue_ops`, the same code path as ``smtp-bridge queue``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from .. import queue_ops
from ..store.history import History, HistoryAttempt, HistoryMessage
from .plot import activity_plot
from .security import Guard

if TYPE_CHECKING:
    from ..config import Config
    from ..sandbox import Sandbox
    from ..store import StateStore

__all__ = ["BreakerView", "Console", "ConsoleSources"]

_HERE: Final = Path(__file__).parent
STATIC: Final = _HERE / "static"
#: Messages per page of the list.
PAGE: Final = 50
#: The biggest .eml "Try a message" takes.
MAX_UPLOAD: Final = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BreakerView:
    """One API key's breaker as the console shows it (the key itself never)."""

    key: str
    state: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class ConsoleSources:
    """What the console reads from the running daemon; each is asked at every request,
    so a reload or a restarted store is seen at once."""

    store: Callable[[], StateStore | None]
    config: Callable[[], Config]
    breakers: Callable[[], list[BreakerView]]
    sandbox: Callable[[], Sandbox | None] = lambda: None
    #: Writes of history that failed since start (history lost, not mail).
    history_failures: Callable[[], int] = lambda: 0


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _reply_class(reply: str) -> str:
    return {"2": "ok", "4": "temp", "5": "perm"}.get(reply[:1], "")


class Console:
    """The console's pages and actions on one admin endpoint."""

    def __init__(self, sources: ConsoleSources, guard: Guard) -> None:
        self.sources = sources
        self.guard = guard
        self._readiness: Callable[[], Awaitable[dict[str, str]]] | None = None
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("smtp_bridge.console", "templates"),
            autoescape=True,  # every value, every template: mail content is hostile
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters.update(
            when=_when, ago=_ago, pretty=_pretty, jsonpretty=_json, reply_class=_reply_class
        )
        env.globals["urlencode"] = urlencode
        self._env = env

    def add_routes(
        self, app: web.Application, readiness: Callable[[], Awaitable[dict[str, str]]]
    ) -> None:
        """Put the console's routes on ``app`` (the admin endpoint's)."""
        self._readiness = readiness
        app.router.add_get("/", self._index)
        app.router.add_get("/messages/{queue_id}", self._message)
        app.router.add_get("/queue", self._queue)
        app.router.add_post("/queue/retry", self._retry)
        app.router.add_post("/queue/purge", self._purge)
        app.router.add_get("/sandbox", self._sandbox)
        app.router.add_get("/try", self._try_form)
        app.router.add_post("/try", self._try)
        app.router.add_static("/static/", STATIC, name="static", append_version=True)

    # -- helpers ------------------------------------------------------------------------------

    def _render(
        self, request: web.Request, name: str, status: int = 200, **context: Any
    ) -> web.Response:
        template = self._env.get_template(name)
        context.setdefault("done", "")
        context.setdefault("query", "")
        html = template.render(
            csrf=self.guard.csrf_token,
            sandbox=self.sources.sandbox() is not None,
            path=request.path,
            static=lambda f: request.app.router["static"].url_for(filename=f),
            **context,
        )
        return web.Response(text=html, status=status, content_type="text/html")

    def _store(self) -> StateStore:
        store = self.sources.store()
        if store is None:
            raise web.HTTPServiceUnavailable(text="the state store is not open\n")
        return store

    def _history(self) -> History | None:
        store = self.sources.store()
        if store is None or not isinstance(store, History):
            return None
        if self.sources.config().admin.history <= 0:
            return None
        return store

    # -- pages --------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        before = _float(request.query.get("before"))
        store = self._store()
        mode = self.sources.config().delivery.mode
        checks = await self._readiness() if self._readiness is not None else {}
        stats = await store.spool_stats()
        dead = await store.dead_letters()
        history = self._history()
        entries = []
        plot = None
        if history is not None:
            entries = await history.search_history(query, limit=PAGE, before=before)
            now = time.time()
            buckets = await history.history_activity(now - 3600, 60)
            plot = activity_plot(buckets, start=now - 3600, bucket=60, slots=60)
        older = entries[-1].message.received_at if len(entries) == PAGE else None
        return self._render(
            request,
            "index.html",
            title="smtp-bridge",
            checks=checks,
            why=_why_not(checks, mode),
            breakers=self.sources.breakers(),
            mode=mode,
            spool=stats,
            dead=dead,
            history_on=history is not None,
            history_failures=self.sources.history_failures(),
            entries=entries,
            plot=plot,
            query=query,
            older=older,
        )

    async def _message(self, request: web.Request) -> web.Response:
        queue_id = request.match_info["queue_id"]
        store = self._store()
        history = self._history()
        message: HistoryMessage | None = None
        attempts: list[HistoryAttempt] = []
        if history is not None:
            message, attempts = await history.history_message(queue_id)
        spooled = await queue_ops.show(store, queue_id)
        if message is None and not attempts and spooled is None:
            return self._render(
                request, "missing.html", status=404, title="Not found", queue_id=queue_id
            )
        by_rcpt: dict[str, list[Any]] = {}
        for attempt in attempts:
            by_rcpt.setdefault(attempt.rcpt, []).append(attempt)
        return self._render(
            request,
            "message.html",
            title=f"Message {queue_id}",
            queue_id=queue_id,
            message=message,
            by_rcpt=by_rcpt,
            spooled=spooled,
            actionable=spooled is not None
            and any(r.state in ("retrying", "unknown", "dead") for r in spooled[1]),
            done=request.query.get("done", ""),
        )

    async def _queue(self, request: web.Request) -> web.Response:
        store = self._store()
        waiting = await queue_ops.list_queue(store, dead=False, limit=500)
        dead = await queue_ops.list_queue(store, dead=True, limit=500)
        return self._render(
            request,
            "queue.html",
            title="Spool and dead letters",
            waiting=waiting,
            dead=dead,
            done=request.query.get("done", ""),
        )

    async def _sandbox(self, request: web.Request) -> web.Response:
        sandbox = self.sources.sandbox()
        if sandbox is None:
            raise web.HTTPNotFound(text="no sandbox: start with serve --sandbox\n")
        sent = sandbox.sent()[:200]
        return self._render(request, "sandbox.html", title="Sandbox outbox", sent=sent)

    async def _try_form(self, request: web.Request) -> web.Response:
        return self._render(request, "try.html", title="Try a message", results=None, error="",
                            rcpt="", eml="")  # fmt: skip

    async def _try(self, request: web.Request) -> web.Response:
        from ..dryrun import NoRecipients, dry_run

        form = await request.post()
        raw = b""
        upload = form.get("file")
        if isinstance(upload, web.FileField):
            raw = upload.file.read(MAX_UPLOAD + 1)
        pasted = form.get("eml")
        if not raw and isinstance(pasted, str):
            raw = pasted.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
        rcpt_field = form.get("rcpt")
        rcpt = rcpt_field.strip() if isinstance(rcpt_field, str) else ""
        error = ""
        results = None
        if not raw.strip():
            error = "Paste a message or choose an .eml file."
        elif len(raw) > MAX_UPLOAD:
            error = "That message is larger than 10 MiB."
        else:
            try:
                results = dry_run(raw, self.sources.config(), rcpts=[rcpt] if rcpt else None)
            except NoRecipients:
                error = "The message has no To or Cc address: give a recipient."
        return self._render(
            request,
            "try.html",
            status=200 if not error else 400,
            title="Try a message",
            results=results,
            error=error,
            rcpt=rcpt,
            eml=raw.decode("utf-8", "replace")[:100_000] if isinstance(pasted, str) else "",
        )

    # -- actions (POST, CSRF-checked by the guard) -------------------------------------------

    async def _selection(self, request: web.Request) -> tuple[list[str] | None, str]:
        form = await request.post()
        back = form.get("back")
        target = back if isinstance(back, str) and back.startswith("/") else "/queue"
        if form.get("all_dead") == "1":
            return None, target
        ids = [v for v in form.getall("queue_id", []) if isinstance(v, str) and v]
        if not ids:
            raise web.HTTPSeeOther(_with_done(target, "Nothing selected."))
        return ids, target

    async def _retry(self, request: web.Request) -> web.Response:
        ids, target = await self._selection(request)
        result = await queue_ops.retry(self._store(), ids)
        text = f"{result.queued} recipients due for delivery now."
        if result.stuck:
            text += f" {result.stuck} cannot be retried: their content was not kept."
        if result.missing:
            text += f" Not found: {', '.join(result.missing)}."
        raise web.HTTPSeeOther(_with_done(target, text))

    async def _purge(self, request: web.Request) -> web.Response:
        ids, target = await self._selection(request)
        result = await queue_ops.purge(self._store(), ids)
        text = f"Purged {result.removed} recipients."
        if result.missing:
            text += f" Not found: {', '.join(result.missing)}."
        if ids is not None and target.startswith("/messages/"):
            target = "/queue"  # the message's spool record is gone
        raise web.HTTPSeeOther(_with_done(target, text))


def _why_not(checks: dict[str, str], mode: str) -> list[str]:
    """The failed readiness checks that stop mail; an open breaker only does in direct
    mode (hybrid and queue mode spool meanwhile)."""
    return [
        f"{name}: {verdict}"
        for name, verdict in checks.items()
        if verdict != "ok" and (name != "breaker" or mode == "direct")
    ]


def _with_done(target: str, text: str) -> str:
    path = target.split("?", 1)[0]
    return f"{path}?{urlencode({'done': text})}"


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
