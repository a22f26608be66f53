"""The project documents itself: every docs/ page and section the code cites exists, and nothing
points a reader outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\bdocs/([\w./-]+\.md)(?:#([\w-]+))?")
SOURCES = ("*.py", "*.md", "*.yaml", "*.sh", "*.toml")


def repo_files():
    skip = {".venv", ".git", "outputs", "wandb", "build"}
    return [p for pattern in SOURCES for p in ROOT.rglob(pattern) if not skip & set(p.relative_to(ROOT).parts)]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_cited_docs_page_and_section_exists():
    cited = [(p, m.group(1), m.group(2)) for p in repo_files() for m in CITATION.finditer(p.read_text())]
    assert len({page for _, page, _ in cited}) >= 1 and len(cited) >= 10  # the code does cite the design page
    for source, page, anchor in cited:
        target = ROOT / "docs" / page
        assert target.is_file(), f"{source.relative_to(ROOT)} cites docs/{page}, which does not exist"
        if anchor:
            assert anchor in anchors(target), f"{source.relative_to(ROOT)} cites docs/{page}#{anchor}: no such section"


def test_nothing_points_outside_the_repository():
    for path in repo_files():
        if path == Path(__file__).resolve():
            continue
        text = path.read_text()
        for outside in ("DESIGN.md", str(Path("..") / "shared"), "/work/"):
            assert outside not in text, f"{path.relative_to(ROOT)} mentions {outside!r}"
