"""Route patterns: a shell glob, or a Python regex after ``re:`` (docs/configuration.md).

Both are case-insensitive. A regex is searched, not anchored; a glob must match
the whole value. Patterns are compiled once, at config load, so a bad regex is
a config error with a line number rather than a failure at DATA time.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

__all__ = ["Pattern", "compile_pattern"]

REGEX_PREFIX = "re:"


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled condition value; ``source`` is what the operator wrote."""

    source: str
    regex: re.Pattern[str]
    is_regex: bool

    def search(self, value: str) -> dict[str, str] | None:
        """Named groups when ``value`` matches (empty dict for globs), else None."""
        found = self.regex.search(value)
        if found is None:
            return None
        return {k: v for k, v in found.groupdict().items() if v is not None}

    def __str__(self) -> str:
        return self.source


def compile_pattern(source: str) -> Pattern:
    """Compile a glob or ``re:`` regex; raises ValueError saying what is wrong."""
    if not isinstance(source, str):
        raise ValueError("a pattern must be a string")
    if source.startswith(REGEX_PREFIX):
        body = source[len(REGEX_PREFIX) :]
        try:
            regex = re.compile(body, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return Pattern(source, regex, True)
    # fnmatch.translate anchors at the end (\Z); re.match-like anchoring at the
    # start comes from the leading "^" so that search() means full match.
    return Pattern(source, re.compile("^" + fnmatch.translate(source), re.IGNORECASE), False)
