"""errors.py is a leaf that defines the whole exception tree under one base."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smtp_bridge import errors

ROOT = Path(__file__).parent.parent


def test_importing_the_tree_loads_no_other_module_of_the_package() -> None:
    code = (
        "import sys, smtp_bridge.errors; print(*sorted(m for m in sys.modules if 'bridge.' in m))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["smtp_bridge.errors"]


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n.endswith("Error")])
def test_every_exception_is_a_bridge_error_defined_in_errors(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, errors.BridgeError)
    assert cls.__module__ == "smtp_bridge.errors"


def test_modules_that_raise_them_hand_out_the_same_classes() -> None:
    from smtp_bridge import config, service, store, templating, tls
    from smtp_bridge.store import records

    assert store.StoreError is records.StoreError is errors.StoreError
    assert config.ConfigError is errors.ConfigError
    assert service.StartupError is errors.StartupError
    assert tls.TlsError is errors.TlsError and issubclass(tls.TlsError, ValueError)
    assert templating.TemplateRenderError is errors.TemplateRenderError


def test_constructors_keep_their_context() -> None:
    issue = errors.ConfigIssue("c.yaml", 3, "smtp.listen", "expected host:port")
    err = errors.ConfigError([issue])
    assert err.issues == [issue] and str(err) == "c.yaml:3: smtp.listen: expected host:port"
    assert errors.StoreError("disk full", path=Path("/x")).path == Path("/x")
    rendered = errors.TemplateRenderError("subject", "UndefinedError")
    assert (rendered.field, rendered.reason, str(rendered)) == (
        "subject",
        "UndefinedError",
        "subject: UndefinedError",
    )


def test_no_module_defines_a_public_exception_outside_errors() -> None:
    """Private ones that never leave their module (config's _Problems) may stay."""
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in sorted((ROOT / "smtp_bridge").rglob("*.py"))
        if path.name != "errors.py"
        for line in path.read_text().splitlines()
        if line.startswith("class ")
        and not line.startswith("class _")
        and line.rstrip(":").endswith(("(Exception)", "Error)"))
    ]
    assert found == []
