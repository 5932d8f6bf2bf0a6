"""The README stays a short guide, and no link in it or in docs/ points at a missing file or heading."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def prose(markdown: str) -> str:
    """``markdown`` without fenced blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCED.sub("", markdown))


def anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (``-`` and ``_`` kept), spaces as ``-``, repeats
    numbered ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCED.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        ids.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return ids


def broken_links(page: Path) -> list[str]:
    """``target (reason)`` for every relative link of ``page`` whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(ROOT)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_is_a_short_guide():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_every_docs_page_is_linked_from_the_readme():
    targets = LINK.findall(prose((ROOT / "README.md").read_text()))
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in targets}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_broken_links_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# A page\n\n## Two, words\n\n[ok](#two-words) [ok](b.md) [gone](c.md) "
                                   "[bad anchor](b.md#nope) [web](https://example.org) `[code](d.md)`\n\n"
                                   "```\n[fenced](e.md)\n```\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links(tmp_path / "a.md") == ["c.md (no file c.md)", "b.md#nope (no heading #nope in b.md)"]


def test_anchors_follow_github():
    assert anchors("# Deploying a cell: `make export`\n## B − A per cell\n## Notes\n## Notes\n") == {
        "deploying-a-cell-make-export", "b--a-per-cell", "notes", "notes-1"}
