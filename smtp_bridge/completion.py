"""Shell completion for bash and zsh, generated from the CLI's own parser.

Made from ``build_parser()`` at the time it is printed, so a new option completes
without anyone editing a script. zsh loads the bash function through
``bashcompinit``: one script to keep right instead of two.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Literal

__all__ = ["completion_script"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(every option string, those that take a value)."""
    every: list[str] = []
    valued: list[str] = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        every.extend(s for s in action.option_strings if s.startswith("--"))
        if action.nargs != 0:
            valued.extend(action.option_strings)
    return every, valued


def _words(words: list[str]) -> str:
    return shlex.quote(" ".join(words))


def completion_script(parser: argparse.ArgumentParser, shell: Literal["bash", "zsh"] | str) -> str:
    """The completion script for ``shell``: source it, or put it where the shell looks."""
    prog = parser.prog
    func = "_" + prog.replace("-", "_")
    commands = _subparsers(parser)
    valued: set[str] = set()
    cases: list[str] = []
    top, top_valued = _options(parser)
    valued.update(top_valued)
    cases.append(f"        /) words={_words([*commands, *top])} ;;")
    for name, sub in commands.items():
        options, sub_valued = _options(sub)
        valued.update(sub_valued)
        actions = _subparsers(sub)
        if actions:
            cases.append(f"        {name}/) words={_words([*actions, *options])} ;;")
            for action_name, action in actions.items():
                a_options, a_valued = _options(action)
                valued.update(a_valued)
                cases.append(f"        {name}/{action_name}) words={_words(a_options)} ;;")
        else:
            files = "files=1; " if any(a.dest == "message" for a in sub._actions) else ""
            positional = [
                str(choice)
                for a in sub._actions
                if not a.option_strings and a.choices
                for choice in a.choices
            ]
            cases.append(f"        {name}/*) {files}words={_words([*positional, *options])} ;;")
    value_pattern = "|".join(sorted(valued)) or "--"
    choices: list[str] = []
    for each in [parser, *commands.values()]:
        for option in each._actions:
            if option.option_strings and option.choices and option.nargs != 0:
                pattern = "|".join(option.option_strings)
                values = _words([str(c) for c in option.choices])
                choices.append(
                    f'        {pattern}) COMPREPLY=($(compgen -W {values} -- "$cur")); return ;;'
                )
    choice_cases = "\n".join(dict.fromkeys(choices))
    body = f"""{func}() {{
    local cur prev cmd="" sub="" words="" files=0 i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
{choice_cases}
        --config|-c) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        {value_pattern}) return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {value_pattern}) ((i++)) ;;
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd=${{COMP_WORDS[i]}}
               elif [[ -z $sub ]]; then sub=${{COMP_WORDS[i]}}; fi ;;
        esac
    done
    case "$cmd/$sub" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    if [[ $files == 1 && $cur != -* ]]; then
        COMPREPLY+=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F {func} {prog}
"""
    if shell == "bash":
        return (
            f"# bash completion for {prog}: source it, or save it as\n"
            f"# /usr/share/bash-completion/completions/{prog}\n{body}"
        )
    if shell == "zsh":
        return (
            f"#compdef {prog}\n# zsh completion for {prog}: source it from ~/.zshrc\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + body
        )
    raise ValueError(f"unsupported shell {shell!r}")
