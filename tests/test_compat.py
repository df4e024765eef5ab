"""smtp_bridge/smtp/compat.py refuses an aiosmtpd it was not checked against."""

from __future__ import annotations

import re
from pathlib import Path

import aiosmtpd
import pytest

from smtp_bridge.smtp import compat

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("version", ["1.4.6", "1.4.7", "1.4.10.post1"])
def test_known_minor_versions_are_accepted(version: str) -> None:
    compat.check_version(version)


@pytest.mark.parametrize("version", ["1.5.0", "1.3.2", "2.0.0", "unknown"])
def test_unknown_versions_fail_at_import_with_the_fix_in_the_message(version: str) -> None:
    with pytest.raises(ImportError, match=re.escape(f"aiosmtpd {version} is installed")) as err:
        compat.check_version(version)
    assert "aiosmtpd>=1.4.6,<1.5" in str(err.value)


def test_the_installed_aiosmtpd_is_known() -> None:
    compat.check_version(aiosmtpd.__version__)


def test_pyproject_pins_aiosmtpd_to_the_known_minor_versions() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    [pin] = re.findall(r'"aiosmtpd([<>=][^"]*)"', text)
    assert compat.KNOWN_VERSIONS == ("1.4",)
    assert pin == ">=1.4.6,<1.5"


#: Private modules and names of the email package and asyncio, anywhere.
STDLIB_PRIVATE = re.compile(r"email\._|sslproto|\._buffer\b|\._paused\b|\._app_transport\b")
#: aiosmtpd's private names, in any module that imports aiosmtpd.
AIOSMTPD_PRIVATE = re.compile(
    r"\._reader\b|\._writer\b|_tls_protocol|_original_transport|_handle_client|_timeout_cb"
    r"|_reset_timeout|_timeout_duration|_call_handler_hook|_set_post_data_state|_getaddr"
    r"|_AuthMechAttr|_handle_hooks|_smtp_methods|_auth_methods"
)


def test_private_names_are_used_only_in_compat() -> None:
    """No other module of the package touches aiosmtpd's, asyncio's or email's privates."""
    found = []
    for path in sorted((ROOT / "smtp_bridge").rglob("*.py")):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        uses_aiosmtpd = "aiosmtpd" in text
        for n, line in enumerate(text.splitlines(), 1):
            if STDLIB_PRIVATE.search(line) or (uses_aiosmtpd and AIOSMTPD_PRIVATE.search(line)):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
