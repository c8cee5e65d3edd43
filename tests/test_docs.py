"""The README is one screenful with docs/ behind it: at most 15 kB, and every link from it
and from the pages in docs/ resolves (the file exists; an anchor names a heading there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# The pages a newcomer looks for (issue 24), each linked from the README.
EXPECTED = ("api", "settings", "cli", "architecture", "deploy", "canary", "model-pool", "feature-store",
            "fault-tolerance", "observability", "performance")  # fmt: skip
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.*)", line)):
            out.add(slug(m.group(1)))
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


def test_the_readme_is_at_most_15_kb() -> None:
    """A README a newcomer reads to the end."""
    assert len(README.read_bytes()) <= 15_000


def test_the_readme_links_every_docs_page() -> None:
    """Each page the issue names exists in docs/ and the README links to it."""
    named = {t.split("#")[0] for t in links(README)}
    assert {f"docs/{p}.md" for p in EXPECTED} <= named
    assert {p.stem for p in PAGES} >= set(EXPECTED)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    """Relative links point at files that exist; anchors at headings of their page."""
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert broken == []
