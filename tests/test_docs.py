"""docs/ in step with the code: generated pages match, every key has a meaning, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from smtp_bridge import docgen

ROOT = Path(__file__).resolve().parent.parent
GENERATED = docgen.render_all()


@pytest.mark.parametrize("relative", sorted(GENERATED))
def test_generated_page_matches_the_code(relative: str) -> None:
    path = ROOT / relative
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    assert committed == GENERATED[relative], (
        f"{relative} is out of date with the code; regenerate it with "
        f"`{docgen.COMMAND}` and commit the result"
    )


def _all_keys() -> list[docgen.ConfigKey]:
    return [key for _, keys in docgen.config_keys() for key in keys]


def test_every_config_key_has_a_meaning() -> None:
    missing = [key.path for key in _all_keys() if not key.meaning.strip()]
    assert missing == [], (
        f"config keys without a meaning in docs/configuration.md: {missing}; write a "
        "comment above the field in smtp_bridge/config/ (or an entry in MEANINGS of "
        f"smtp_bridge/docgen/config_page.py), then run `{docgen.COMMAND}`"
    )


def test_every_meaning_names_a_key() -> None:
    paths = {key.path for key in _all_keys()}
    stale = sorted(set(docgen.MEANINGS) - paths)
    assert stale == [], f"docgen.MEANINGS names keys the config does not have: {stale}"


def test_configuration_page_lists_known_keys_with_their_defaults() -> None:
    page = GENERATED["docs/configuration.md"]
    assert "| `mode` | `direct` \\| `hybrid` \\| `queue` | `direct` |" in page
    assert "| `max_message_size` | size | `10MiB` |" in page
    assert "| `app_key_file` | path |" in page  # the *_file twins of secrets
    assert "## `smtp.auth.users.<name>`" in page


def test_reply_page_row_for_every_api_code() -> None:
    page = GENERATED["docs/replies.md"]
    for code, reply in [(40005, "550 5.1.3"), (40007, "451 4.3.2"), (40008, "554 5.6.0")]:
        assert re.search(rf"^\| API code {code} .*\| `{reply} ", page, re.MULTILINE), code


def test_check_mode_reports_stale_pages_and_writing_fixes_them(tmp_path: Path) -> None:
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 1
    assert not (tmp_path / "docs").exists()  # --check writes nothing
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--root", str(tmp_path), "--check"]) == 0
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == sorted(
        Path(r).name for r in GENERATED
    )


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", heading.lower())
        anchors.add(text.replace(" ", "-"))
    return anchors


PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_pages_and_headings_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or (
            anchor
            and linked.suffix == ".md"
            and anchor not in _anchors(linked.read_text(encoding="utf-8"))
        ):
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"
