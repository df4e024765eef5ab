"""Pure: what logs, errors and replies may show of a database URL, and what they must not."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["redact_url", "secrets_of"]


def redact_url(url: str) -> str:
    """``url`` as logs and errors may show it: no password, no query (it may hold one)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    user = f"{parts.username}@" if parts.username else ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def secrets_of(url: str) -> list[str]:
    """The password of ``url`` (in its authority or its query), to scrub from messages."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [value for key, value in parse_qsl(parts.query) if key == "password" and value]
    # libpq may quote it decoded or as written: scrub both.
    return sorted({*found, *(unquote(value) for value in found)}, key=len, reverse=True)
