"""docs/cli.md from ``cli.build_parser()``: every command and its arguments."""

from __future__ import annotations

import argparse

from .. import cli
from .markdown import cell, header

__all__ = ["render_cli"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _render_command(
    name: str, parser: argparse.ArgumentParser, summary: str, out: list[str]
) -> None:
    out.append(f"\n## {name}\n\n{summary[:1].upper()}{summary[1:]}.\n")
    rows: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            what = f"`{flags} {metavar}`" if action.nargs != 0 else f"`{flags}`"
        else:
            what = f"`{metavar}`"
        helptext = action.help or ""
        if action.choices:
            helptext = f"{helptext} one of: " + ", ".join(f"`{c}`" for c in action.choices)
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            shown = ""
        else:
            shown = f"`{default}`" if default != "" else '`""`'
        rows.append(f"| {what} | {shown} | {cell(helptext.strip())} |\n")
    if rows:
        out.append("\n| argument | default | meaning |\n|---|---|---|\n")
        out.extend(rows)
    helps = _helps(parser)
    for sub_name, sub in _subcommands(parser).items():
        _render_command(f"{name} {sub_name}", sub, helps.get(sub_name, ""), out)


def render_cli() -> str:
    """docs/cli.md: every command with its arguments, from ``cli.build_parser()``."""
    parser = cli.build_parser()
    out = [
        header("`smtp_bridge/cli.py`"),
        "# Command line\n\n",
        f"`smtp-bridge`: {parser.description} `smtp-bridge --version` prints the\n",
        "version. An option belongs after the command it is listed under.\n\n",
        "Exit status: 0 ok; 1 a config error (each problem printed as\n",
        "`file:line: key.path: message`) or a bad argument; 2 `serve` could not\n",
        "start (a port in use, say).\n",
    ]
    helps = _helps(parser)
    for name, sub in _subcommands(parser).items():
        _render_command(f"smtp-bridge {name}", sub, helps.get(name, ""), out)
    return "".join(out)
