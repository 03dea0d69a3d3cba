"""The README is a short front door and docs/ the manual: every relative link in them must lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target), "title" allowed
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
ABSOLUTE = ("http://", "https://", "mailto:")


def prose(path: Path) -> str:
    """The page without fenced code blocks, whose brackets and hashes are not links or headings."""
    return FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces as hyphens; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(prose(path)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in LINK.findall(CODE_SPAN.sub("", prose(page))):
        if target.startswith(ABSOLUTE):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not resolved.exists():
            broken.append(f"{where}: no such file or folder")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading #{anchor} in {resolved.name}")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    assert len(PAGES) > 1, "docs/ has no pages"
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code`, title\n## Twice\n## Twice\n[ok](#a-code-title) [ok](#twice-1) [ok](.) `[code](x.md)`\n"
        "```\n[in a code block](nowhere.md)\n# not a heading\n```\n[bad](#nope) [bad](#not-a-heading) [bad](gone.md)\n"
    )
    broken = [b.rsplit(": ", 1)[1] for b in broken_links(page, tmp_path)]
    assert broken == ["no heading #nope in page.md", "no heading #not-a-heading in page.md", "no such file or folder"]


def test_readme_stays_a_front_door_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
