"""The value types of config keys: each a parser, and the JSON Schema editors check it with.

Durations, sizes, rates, addresses, networks, patterns, templates, replies, files
and secrets; a type that also takes one value where a list is expected says so in
its schema (``_one_or_list``), which the docs generator reads.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, SecretStr, WithJsonSchema
from pydantic.config import JsonDict

from ..patterns import Pattern, compile_pattern
from ..replies import Reply
from ..templating import CompiledTemplate, compile_template

__all__ = [
    "Duration",
    "HostName",
    "HttpUrl",
    "ListenAddress",
    "ListenList",
    "NetworkList",
    "OptionalSecret",
    "PatternList",
    "Rate",
    "RateT",
    "ReadableFile",
    "ReplyT",
    "Size",
    "TemplateT",
    "compile_quietly",
    "parse_duration",
    "parse_size",
    "split_host_port",
]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``2m``, ``1h``, ``3d``, ``500ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 2m, 1h or 3d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        found = _DURATION_RE.match(str(value))
        if not found:
            raise ValueError(f"expected a duration such as 30s, 2m, 1h or 3d, got {value!r}")
        seconds = float(found.group(1)) * _DURATION_UNITS[found.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``10MiB``, ``512KB``, ``1G`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10MiB")
    if isinstance(value, int):
        size = value
    else:
        found = _SIZE_RE.match(str(value))
        if not found:
            raise ValueError(f"expected a size such as 10MiB or 512KB, got {value!r}")
        size = int(float(found.group(1)) * _SIZE_UNITS[(found.group(2) or "").lower()])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int) and not isinstance(value, bool) else value


def _to_pattern(value: Any) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if not isinstance(value, str):
        raise ValueError("a pattern must be a string (a glob, or a regex after 're:')")
    return compile_pattern(value)


def _to_template(value: Any) -> CompiledTemplate:
    if isinstance(value, CompiledTemplate):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected a string (a Jinja2 template)")
    return compile_quietly(value)


def compile_quietly(source: str) -> CompiledTemplate:
    """``compile_template`` without Jinja's DeprecationWarning for escapes like ``'\\S'``.

    Jinja decodes string literals with ``unicode-escape``, which keeps an unknown
    escape as written (what a regex such as docs/configuration.md's ``regex_search('https://\\S+')``
    wants) but warns; where warnings are errors, Jinja reports that warning as a
    syntax error, so the same file would pass or fail depending on -W flags.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return compile_template(source)


def _to_reply(value: Any) -> Reply:
    if isinstance(value, Reply):
        return value
    return Reply.parse(str(value))


_DURATION_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _DURATION_RE.pattern}]
}
_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": _SIZE_RE.pattern}]
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
PatternT = Annotated[
    Pattern,
    BeforeValidator(_to_pattern),
    WithJsonSchema({"type": "string", "description": "shell glob, or 're:' + Python regex"}),
]


def _one_or_list(item: JsonDict) -> WithJsonSchema:
    """Schema of a field that takes one value or a list of them (``_as_list``)."""
    return WithJsonSchema({"anyOf": [item, {"type": "array", "items": item}]})


_PATTERN_SCHEMA: JsonDict = {"type": "string", "description": "shell glob, or 're:' + Python regex"}
_NETWORK_SCHEMA: JsonDict = {"type": "string", "description": "CIDR, e.g. 10.0.0.0/8"}
_LISTEN_SCHEMA: JsonDict = {"type": "string", "description": "host:port or [ipv6]:port"}
PatternList = Annotated[list[PatternT], BeforeValidator(_as_list), _one_or_list(_PATTERN_SCHEMA)]
TemplateT = Annotated[
    CompiledTemplate,
    BeforeValidator(_to_template),
    WithJsonSchema({"type": ["string", "number"], "description": "Jinja2 template (sandboxed)"}),
]
ReplyT = Annotated[
    Reply,
    BeforeValidator(_to_reply),
    WithJsonSchema({"type": "string", "pattern": r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} .+"}),
]
Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(lambda v: ipaddress.ip_network(str(v), strict=False)),
    WithJsonSchema(_NETWORK_SCHEMA),
]
NetworkList = Annotated[list[Network], BeforeValidator(_as_list), _one_or_list(_NETWORK_SCHEMA)]


def _check_listen(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected host:port or [ipv6]:port, e.g. 127.0.0.1:2525")
    host, port = split_host_port(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return value


ListenAddress = Annotated[str, BeforeValidator(_check_listen), WithJsonSchema(_LISTEN_SCHEMA)]
ListenList = Annotated[list[ListenAddress], BeforeValidator(_as_list), _one_or_list(_LISTEN_SCHEMA)]


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); raises ValueError otherwise."""
    found = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not found:
        raise ValueError(f"expected host:port or [ipv6]:port, got {value!r}")
    host = found.group(1) if found.group(1) is not None else found.group(3)
    port = int(found.group(2) or found.group(4))
    return host, port


def _matching(regex: str, expected: str) -> AfterValidator:
    """A check that a string matches ``regex`` from its start; ``expected`` says what fits."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(expected)
        return value

    return AfterValidator(check)


#: The banner and EHLO name: ``\Z`` makes the whole name match.
HostName = Annotated[
    str,
    _matching(r"[A-Za-z0-9.\-]{1,253}\Z", "expected a host name (letters, digits, dots, hyphens)"),
]
#: An http(s) URL kept as the string written (pydantic's HttpUrl would normalise it).
HttpUrl = Annotated[str, _matching(r"https?://[^/\s]+", "expected an http:// or https:// URL")]


_RATE_RE = re.compile(r"\s*([0-9]{1,12})\s*/\s*([smhd])\s*", re.IGNORECASE)
_RATE_UNITS: Mapping[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` per ``window`` seconds, written ``N/s``, ``N/m``, ``N/h`` or ``N/d``."""

    count: int
    window: float

    def __str__(self) -> str:
        unit = next(u for u, seconds in _RATE_UNITS.items() if seconds == self.window)
        return f"{self.count}/{unit}"


def _to_rate(value: Any) -> Rate:
    if isinstance(value, Rate):
        return value
    found = _RATE_RE.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError("expected a rate like 1000/h: a count, '/', and s, m, h or d")
    count = int(found.group(1))
    if count < 1:
        raise ValueError("the count of a rate must be at least 1")
    return Rate(count, _RATE_UNITS[found.group(2).lower()])


RateT = Annotated[
    Rate,
    BeforeValidator(_to_rate),
    WithJsonSchema({"type": "string", "pattern": r"^\s*[0-9]+\s*/\s*[smhdSMHD]\s*$"}),
]


def _check_readable(path: Path) -> Path:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


ReadableFile = Annotated[Path, AfterValidator(_check_readable)]


def _empty_as_none(value: SecretStr | None) -> SecretStr | None:
    # ``app_key: ${KEY:-}`` means "no key here", as if the line were absent.
    return value if value is not None and value.get_secret_value() else None


OptionalSecret = Annotated[SecretStr | None, AfterValidator(_empty_as_none)]
