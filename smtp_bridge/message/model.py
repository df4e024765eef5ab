"""The values a parsed message gives templates: mailboxes, attachments, headers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["EMPTY_ADDRESS", "Address", "Attachment", "HeaderMap", "ParsedMessage"]


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox, split so templates can use ``.local`` and ``.domain`` directly."""

    address: str
    name: str
    local: str
    domain: str

    def __str__(self) -> str:
        return self.address


#: What a missing or unreadable address becomes, so templates never meet ``None``.
EMPTY_ADDRESS = Address("", "", "", "")


@dataclass(frozen=True, slots=True)
class Attachment:
    """What templates may know about an attached file: never its content."""

    filename: str
    content_type: str
    size: int


class HeaderMap(Mapping[str, str]):
    """Case-insensitive, read-only view of decoded header values (first occurrence wins for [])."""

    __slots__ = ("_items", "_names", "_values")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = tuple(items)
        values: dict[str, list[str]] = {}
        names: dict[str, str] = {}
        for name, value in self._items:
            key = name.lower()
            values.setdefault(key, []).append(value)
            names.setdefault(key, name)
        self._values = {key: tuple(found) for key, found in values.items()}
        self._names = tuple(names.values())

    def __getitem__(self, name: str) -> str:
        try:
            return self._values[name.lower()][0]
        except (KeyError, AttributeError):
            raise KeyError(name) from None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in message order (Received, say); [] if absent."""
        return list(self._values.get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"HeaderMap({list(self._items)!r})"


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything the template context takes from the message itself (docs/routing.md)."""

    subject: str = ""
    sender: Address = EMPTY_ADDRESS
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    headers: HeaderMap = field(default_factory=HeaderMap)
    text: str = ""
    html: str = ""
    message_id: str = ""
    date: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    defects: int = 0
