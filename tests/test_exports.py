"""Every module declares its public surface, and every declared name exists."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import smtp_bridge
from smtp_bridge import config, smtp

MODULES = sorted(
    [m.name for m in pkgutil.iter_modules(smtp_bridge.__path__) if m.name != "__main__"]
    + [f"smtp.{m.name}" for m in pkgutil.iter_modules(smtp.__path__)]
    + [f"config.{m.name}" for m in pkgutil.iter_modules(config.__path__)]
)


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all_and_every_name_exists(name: str) -> None:
    module = importlib.import_module(f"smtp_bridge.{name}")
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"smtp_bridge.{name} has no __all__"
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []


@pytest.mark.parametrize("name", MODULES)
def test_module_has_a_docstring_saying_its_job(name: str) -> None:
    module = importlib.import_module(f"smtp_bridge.{name}")
    assert module.__doc__ and module.__doc__.strip()


def test_package_exports_only_its_version() -> None:
    assert smtp_bridge.__all__ == ["__version__"]
