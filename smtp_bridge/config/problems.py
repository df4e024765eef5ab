"""Key paths in the config file, and the problems a model validator finds below itself.

``_Problems`` is private to the config package: the loader unpacks it into
ConfigIssues (errors.py holds the public exception tree).
"""

from __future__ import annotations

__all__ = ["Loc", "dotted"]

#: A key path in the config file: mapping keys and list positions.
Loc = tuple[str | int, ...]


class _Problems(ValueError):
    """Problems a model validator found, each at a key path *below* the model.

    pydantic locates a model validator's error at the model itself; the loader
    unpacks these so each problem points at its own key and line.
    """

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__(
            "; ".join(f"{dotted(loc)}: {msg}" if loc else msg for loc, msg in problems)
        )
        self.problems = problems


def dotted(loc: Loc) -> str:
    """A key path as the operator reads it: ``routes[0].match.rcpt``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)
