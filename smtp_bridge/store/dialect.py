"""How a backend spells the SQL both backends share, and a statement ready to run.

The statements SQLite and PostgreSQL run alike are written once
(:mod:`.admin_sql`, :mod:`.history_sql`, :mod:`.spool_sql`) against a
:class:`Dialect`; each backend declares its own (``schema.DIALECT``) and runs the
:class:`Query` objects on its own connection, in its own transaction. What only
one engine can say (``FOR UPDATE SKIP LOCKED``, ``DISTINCT ON``, the writer
thread's batches) stays in the backend.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Dialect", "Query"]


class Query(NamedTuple):
    """One statement and its parameters: ``conn.execute(*query)``."""

    sql: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Dialect:
    """A backend's parameter marks, value sets and case-insensitive LIKE."""

    #: The bound-parameter mark: ``?`` (sqlite3's qmark) or ``%s`` (psycopg's format).
    mark: str
    #: True: a set of values is one array parameter (``state = ANY(%s)``);
    #: False: one mark per value (``state IN (?, ?)``).
    arrays: bool
    #: ``{column}`` contains the LIKE pattern at ``{mark}``, whatever the case.
    ilike: str

    def one_of(self, column: str, values: Collection[str]) -> tuple[str, tuple[Any, ...]]:
        """The condition "``column`` is one of ``values``" and its parameters."""
        if self.arrays:
            return f"{column} = ANY({self.mark})", (list(values),)
        return f"{column} IN ({', '.join([self.mark] * len(values))})", tuple(values)

    def contains(self, column: str) -> str:
        """The condition "``column`` matches the pattern parameter", ESCAPE ``\\``."""
        return self.ilike.format(column=column, mark=self.mark) + " ESCAPE '\\'"
