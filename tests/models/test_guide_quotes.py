"""The adding-a-model guides quote the repo: every block marked `<!-- quote: PATH -->` must appear in PATH.

A quoted block's lines must occur in the file in the same order, verbatim (trailing spaces aside);
a line `...` stands for lines left out.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ["docs/adding_a_model.md", "docs/adding_a_model.zh.md"]
QUOTE = re.compile(r"<!-- quote: (\S+) -->\n```python\n(.*?)\n```", re.S)


def _quotes(guide: str) -> list[tuple[str, str]]:
    return QUOTE.findall((ROOT / guide).read_text(encoding="utf-8"))


def _missing_line(block: str, source: list[str]) -> str | None:
    """The first quoted line not found (in order) in `source`, or None."""
    pos = 0
    for line in block.splitlines():
        if line.strip() == "...":
            continue
        try:
            pos = source.index(line.rstrip(), pos) + 1
        except ValueError:
            return line
    return None


@pytest.mark.parametrize("guide", GUIDES)
def test_quoted_code_is_in_the_repo(guide):
    quotes = _quotes(guide)
    assert len(quotes) >= 6, f"{guide}: expected the walkthrough's quoted blocks, found {len(quotes)}"
    for path, block in quotes:
        source = [line.rstrip() for line in (ROOT / path).read_text().splitlines()]
        missing = _missing_line(block, source)
        assert missing is None, f"{guide} quotes {path}, which has no line {missing!r} (in that order)"


def test_the_two_guides_quote_the_same_code():
    assert _quotes(GUIDES[0]) == _quotes(GUIDES[1])
