"""HTML made readable text, for ``text`` when a message has only an HTML body."""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]


def html_to_text(html: str) -> str:
    """Readable text from HTML, for ``text`` when a message has no text part.

    Tags removed, <script> and <style> contents dropped, entities decoded, block
    elements (p, br, div, li, tr, h1-h6, ...) become line breaks, table cells are
    separated by a space, runs of blank lines collapse to one; the result is stripped.
    """
    parser = _TextExtractor()
    try:
        parser.feed(html)
        parser.close()
    except Exception:
        # Belt and braces: HTMLParser has asserts for odd markup; keep what was read.
        pass
    return parser.text()


_LINE_TAGS = frozenset({"div", "li", "tr", "dt", "dd", "section", "article", "header", "footer"})
_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre", "hr"}
)
_CELL_TAGS = frozenset({"td", "th"})
# <title> repeats the subject; browsers never show it in the page either.
_DROPPED_TAGS = frozenset({"script", "style", "title"})
_HTML_SPACE = re.compile(r"[ \t\n\r\f\v\xa0]+")
# Zero-width characters newsletters pad their preview text with.
_INVISIBLE = re.compile(r"[\u00ad\u034f\u200b-\u200d\u2060\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    """Collects text; line ends owed by block tags are written just before the next text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._pending = 0  # line ends owed before the next text
        self._dropped = 0  # depth inside <script>, <style>, <title>
        self._pre = 0  # depth inside <pre>
        self._last = "\n"  # last character written; "\n" at the start

    def parse_marked_section(self, i: int, report: bool = True) -> int:
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            # An unknown "<![keyword" (Outlook's conditionals gone wrong) would end
            # the parse; skip it up to its ">" as a browser does a bogus comment.
            end = self.rawdata.find(">", i + 3)
            return -1 if end < 0 else end + 1

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, opening=True)

    def handle_endtag(self, tag: str) -> None:
        self._tag(tag, opening=False)

    def _tag(self, tag: str, *, opening: bool) -> None:
        step = 1 if opening else -1
        if tag in _DROPPED_TAGS:
            self._dropped = max(self._dropped + step, 0)
        elif tag == "br":
            if opening:
                self._pending += 1
        elif tag in _PARAGRAPH_TAGS:
            self._pending = max(self._pending, 2)
            if tag == "pre":
                self._pre = max(self._pre + step, 0)
        elif tag in _LINE_TAGS:
            self._pending = max(self._pending, 1)
        elif tag in _CELL_TAGS and opening:
            self.handle_data(" ")

    def handle_data(self, data: str) -> None:
        if self._dropped:
            return
        data = _INVISIBLE.sub("", data)
        if self._pre:
            data = data.replace("\r\n", "\n").replace("\r", "\n")
        else:
            data = _HTML_SPACE.sub(" ", data)
            if self._pending or self._last in " \n":
                data = data.lstrip(" ")
        if not data:
            return
        if self._pending and self._out:
            # More than one blank line never helps a reader.
            self._out.append("\n" * min(self._pending, 2))
        self._pending = 0
        self._out.append(data)
        self._last = data[-1]

    def text(self) -> str:
        text = _TRAILING_SPACE.sub("\n", "".join(self._out))
        return _BLANK_LINES.sub("\n\n", text).strip()
