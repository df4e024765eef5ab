"""Text from a message made safe for templates: one line, no smuggled bytes.

The parser keeps 8-bit header bytes as surrogates, and a header value may hold
any line break str.splitlines() knows; neither may reach a template.
"""

from __future__ import annotations

import re

__all__ = ["desurrogate", "one_line"]

# Everything str.splitlines() splits on: a header value must stay one line.
_LINE_BREAKS = re.compile(r"[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_SURROGATES = re.compile(r"[\udc80-\udcff]+")


def desurrogate(text: str) -> str:
    """Bytes the parser smuggled in as surrogates, read as UTF-8, else Latin-1."""
    if not _SURROGATES.search(text):
        return text
    return _SURROGATES.sub(_undo_surrogates, text)


def _undo_surrogates(match: re.Match[str]) -> str:
    raw = match.group().encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def one_line(text: str) -> str:
    """``text`` with every run of line breaks made one space."""
    return _LINE_BREAKS.sub(" ", text)
