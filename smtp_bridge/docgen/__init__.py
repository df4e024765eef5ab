"""Writes the reference pages of docs/ from the code, so they cannot drift from it.

``python -m smtp_bridge.docgen`` rewrites docs/configuration.md (from the
pydantic config model), docs/replies.md (from the reply table in replies.py)
and docs/cli.md (from the argparse parser); ``--check`` writes nothing and
exits 1 when a committed page differs. tests/test_docs.py runs the same check.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .cli_page import render_cli
from .config_page import MEANINGS, ConfigKey, config_keys, render_configuration
from .markdown import COMMAND
from .reply_page import render_replies

__all__ = ["COMMAND", "MEANINGS", "ConfigKey", "config_keys", "main", "render_all"]


def render_all() -> dict[str, str]:
    """Every generated page, by path relative to the repository root."""
    return {
        "docs/configuration.md": render_configuration(),
        "docs/replies.md": render_replies(),
        "docs/cli.md": render_cli(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Write the pages under ``--root`` (default: here), or with ``--check`` list stale ones."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for relative, text in render_all().items():
        path = args.root / relative
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(relative)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for relative in stale:
        print(f"{'stale' if args.check else 'wrote'}: {relative}")
    return 1 if stale and args.check else 0
