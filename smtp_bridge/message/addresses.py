"""Addresses: envelope ones checked and split, every one made an Address for templates.

The syntax check follows RFC 5321 4.1.2 and RFC 6531 3.3 (UTF-8 allowed), so
RCPT can answer ``553 5.1.3`` before any DATA is read.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from .model import EMPTY_ADDRESS, Address
from .sanitize import desurrogate, one_line

__all__ = ["is_valid_address", "mailbox", "parse_address"]


def parse_address(value: str) -> Address:
    """Split an envelope address (MAIL FROM / RCPT TO) into an Address for templates.

    Accepts ``a@b``, ``<a@b>`` and ``''`` (the null sender, giving EMPTY_ADDRESS).
    """
    address = value.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    # RFC 5321 4.1.2: a source route (<@relay:user@domain>) MUST be accepted, SHOULD be ignored.
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]
    return mailbox(address, "")


def is_valid_address(value: str) -> bool:
    """Syntax check for an envelope recipient, so RCPT can answer ``553 5.1.3`` early.

    Exactly one addr-spec ``local@domain``: no display name, no spaces, control
    characters or angle brackets; local part (dot-atom or quoted, UTF-8 allowed)
    at most 64 octets, the whole at most 254; the domain dot-separated labels of
    letters, digits and hyphens (IDNA/UTF-8 letters allowed) or an address
    literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``.
    """
    if len(value) <= 254 and _PLAIN_ADDRESS.fullmatch(value):
        return True  # the usual ASCII address: one regex, the same answer
    return _checked_address(value)


def _checked_address(value: str) -> bool:
    if not value or _FORBIDDEN.search(value):
        return False
    # RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
    if len(value.encode()) > 254:
        return False
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        return False
    # RFC 5321 4.5.3.1.1: local part at most 64 octets.
    if len(local.encode()) > 64:
        return False
    return _valid_local(local) and _valid_domain(domain)


def mailbox(address: str, name: str) -> Address:
    """An Address from an addr-spec and display name, each cleaned to one line."""
    address = one_line(desurrogate(address)).strip()
    name = one_line(desurrogate(name)).strip()
    if not address:
        return EMPTY_ADDRESS
    local, at, domain = address.rpartition("@")
    if not at:
        return Address(address, name, address, "")
    return Address(address, name, local, domain)


# --- envelope address syntax (RFC 5321 4.1.2, RFC 6531 3.3) -------------------

# Whitespace, controls (C0, DEL, C1), lone surrogates, angle brackets.
_FORBIDDEN = re.compile(r"[\s<>\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def _utf8_char_ok(char: str) -> bool:
    # RFC 6531 UTF8-non-ascii, minus format characters and separators (spoofing).
    return unicodedata.category(char)[0] not in "CZ"


# An ASCII dot-atom local part of at most 64 characters at LDH labels of 1 to 63:
# every address this matches passes the checks below (tests/test_fast_paths.py
# compares the two on generated and hostile addresses); anything else takes them.
_ASCII_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ASCII_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_ADDRESS = re.compile(
    rf"(?=[^@]{{1,64}}@){_ASCII_ATOM}(?:\.{_ASCII_ATOM})*@{_ASCII_LABEL}(?:\.{_ASCII_LABEL})*"
)


def _valid_local(local: str) -> bool:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return _valid_quoted(local[1:-1])
    return all(
        atom and all(c in _ATEXT or (c > "\x7f" and _utf8_char_ok(c)) for c in atom)
        for atom in local.split(".")
    )


def _valid_quoted(inner: str) -> bool:
    escaped = False
    for char in inner:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"' or (char > "\x7f" and not _utf8_char_ok(char)):
            return False
    return not escaped


def _valid_domain(domain: str) -> bool:
    if domain[0] == "[" and domain[-1] == "]":
        return _valid_literal(domain[1:-1])
    return all(_valid_label(label) for label in domain.split("."))


def _valid_literal(literal: str) -> bool:
    try:
        if literal[:5].lower() == "ipv6:":
            # ipaddress accepts a %scope suffix; an address literal has none.
            return "%" not in literal and bool(ipaddress.IPv6Address(literal[5:]))
        return bool(ipaddress.IPv4Address(literal))
    except ValueError:
        return False


def _valid_label(label: str) -> bool:
    if not label or label[0] == "-" or label[-1] == "-":
        return False
    if label.isascii():
        return len(label) <= 63 and all(c in _LDH for c in label)
    if not all(c in _LDH or (c > "\x7f" and unicodedata.category(c)[0] in "LMN") for c in label):
        return False
    # RFC 5890: the A-label ("xn--" + punycode) must fit in 63 octets.
    return len(label.encode("punycode")) + 4 <= 63
