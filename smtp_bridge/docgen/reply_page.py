"""docs/replies.md from replies.py: the API-result table through ``reply_for``, and every reply."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from .. import replies, sandbox
from ..outcomes import ApiResult, ResultKind
from .markdown import cell, header

__all__ = ["render_replies"]


def _constant_notes() -> dict[str, str]:
    """The ``#:`` comment above each reply constant of replies.py, by name."""
    notes: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(replies).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
        elif "=" in stripped and stripped.split("=")[0].strip().isupper():
            if pending:
                notes[stripped.split("=")[0].strip()] = " ".join(pending)
            pending = []
        elif not stripped.startswith("#"):
            pending = []
    return notes


def _reply_names() -> dict[replies.Reply, str]:
    names: dict[replies.Reply, str] = {}
    for name in replies.__all__:
        value = getattr(replies, name)
        if isinstance(value, replies.Reply):
            names.setdefault(value, name)
    return names


def _results() -> Iterator[tuple[str, str, ApiResult]]:
    """(what the API did, its ``replies:`` key, the result) for every row of the table."""
    for code in sorted(replies._API_CODES):
        what = f"API code {code} ({sandbox.MESSAGES.get(code, '?')})"
        yield what, str(code), ApiResult(ResultKind.API, code=code)
    yield "any other API code", "(the code)", ApiResult(ResultKind.API, code=99999)
    for status in sorted(replies._HTTP_STATUSES):
        yield f"HTTP {status}", f"http:{status}", ApiResult(ResultKind.HTTP, http_status=status)
    yield "any other HTTP status", "http:<status>", ApiResult(ResultKind.HTTP, http_status=418)
    kinds = {
        ResultKind.NEVER_SENT: "request never sent (refused, DNS, TLS)",
        ResultKind.UNKNOWN: "timeout or reset after sending",
        ResultKind.BAD_BODY: "HTTP 200 but not the API's JSON",
    }
    for kind in replies._KIND_REPLIES:
        yield kinds.get(kind, kind.value), kind.value, ApiResult(kind)


def render_replies() -> str:
    """docs/replies.md: the API-result table, then every other reply the bridge sends."""
    names, notes = _reply_names(), _constant_notes()
    out = [
        header("`smtp_bridge/replies.py`"),
        "# SMTP replies\n\n",
        "## API result to SMTP reply\n\n",
        "One API call per recipient; each result becomes the reply below\n",
        "(`replies.reply_for`). How replies of several recipients combine, and what\n",
        "the delivery modes do with a `4xx`, is in [guarantees.md](guarantees.md).\n",
        "Every reply to DATA ends with ` id=<queue id>`.\n\n",
        "| API result | `replies:` key | SMTP reply | constant | note |\n|---|---|---|---|---|\n",
    ]
    for what, key, result in _results():
        reply = replies.reply_for(result)
        name = names.get(reply, "")
        out.append(f"| {what} | `{key}` | `{reply}` | `{name}` | {cell(notes.get(name, ''))} |\n")
    out += [
        "\nA 40006 (bad `reply_to`) is first resent once without `reply_to`; only a second\n",
        "40006 reaches the table. 40001, 40002 and 40007 open the circuit breaker at once.\n",
        "An HTTP 429 lowers the API key's pace (AIMD) and other mail goes on; only three\n",
        "in a row, or a Retry-After (at most `api.max_retry_after`), pause the key.\n\n",
        "The `replies:` section of the config overrides a row by its key; a failure must\n",
        "stay `4xx`/`5xx` and code 200 must stay `2xx` (checked at load).\n\n",
        "## Every reply constant\n\n",
        "Every reply the bridge sends is one of these (`smtp_bridge/replies.py`).\n\n",
        "| constant | reply | note |\n|---|---|---|\n",
    ]
    for reply, name in names.items():
        out.append(f"| `{name}` | `{reply}` | {cell(notes.get(name, ''))} |\n")
    return "".join(out)
