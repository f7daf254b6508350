"""The documentation holds together: README.md stays a short door (at most 250 lines) that links every
page under docs/, and every relative link in README.md and docs/*.md reaches an existing file and, for
`#anchor` links into markdown, a heading of that file (GitHub's heading slugs)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def _prose_lines(text: str) -> List[str]:
    """The lines outside fenced code blocks (links and headings inside them are not markdown)."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lowercase, punctuation other than '-' and
    '_' removed, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)       # links: their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                               # \w keeps letters, digits, '_'
    return text.replace(" ", "-")


def anchors(text: str) -> Set[str]:
    """Every heading anchor of a markdown text (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: Dict[str, int] = {}
    out = set()
    for line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> List[str]:
    """The targets of the markdown links of a text, outside code blocks and code spans."""
    out = []
    for line in _prose_lines(text):
        line = _CODE_SPAN.sub("", line)
        out.extend(m.group(2) for m in _LINK.finditer(line))
    return out


def broken_links(path: Path) -> List[str]:
    """'target: why' for every relative link of the markdown file `path` that does not resolve."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for target in links(text):
        if target.lower().startswith(_EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
            continue
        if anchor and dest.suffix.lower() == ".md" and dest.is_file():
            if anchor.lower() not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with anchor '#{anchor}' in {dest.name}")
    return problems


def _doc_files() -> List[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---- the helpers on small known texts: they can fail -----------------------------------------------
def test_slug_follows_githubs_rule():
    assert slug("What set-up does (`tools/setup.sh`)") == "what-set-up-does-toolssetupsh"
    assert slug("Feeding the GPU: DALI decode, replay, tar shards") == "feeding-the-gpu-dali-decode-replay-tar-shards"
    assert slug("The official supervised EfficientTrain++ recipes") == "the-official-supervised-efficienttrain-recipes"
    assert slug("Detection transfer (MMDetection 3.x)") == "detection-transfer-mmdetection-3x"
    assert slug("See [the page](x.md) now") == "see-the-page-now"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n### B_c\n") == {"a", "a-1", "b_c"}


def test_broken_links_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Real section: here\n", encoding="utf-8")
    (tmp_path / "data.json").write_text("{}", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok anchor](docs/page.md#real-section-here) [`code` text](data.json)\n"
        "[self](#top) [web](https://example.com/missing.md) [mail](mailto:a@b.c)\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such-section) [bad self](#nowhere)\n"
        "`[in a code span](docs/also-missing.md)`\n"
        "```\n[in a code block](docs/also-missing.md)\n```\n", encoding="utf-8")
    problems = broken_links(readme)
    assert len(problems) == 3, problems
    assert problems[0].startswith("docs/missing.md: ") and problems[0].endswith("does not exist")
    assert problems[1] == "docs/page.md#no-such-section: no heading with anchor '#no-such-section' in page.md"
    assert problems[2] == "#nowhere: no heading with anchor '#nowhere' in README.md"
    readme.write_text("[fine](docs/page.md#page)\n", encoding="utf-8")
    assert broken_links(readme) == []


# ---- the repository's documentation ---------------------------------------------------------------
@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == [], f"broken links in {doc.relative_to(ROOT)}"


def test_readme_is_a_short_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail into docs/"


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))
              if not t.lower().startswith(_EXTERNAL) and t.partition("#")[0]}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages README.md does not link: {missing}"


def test_readme_keeps_the_command_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash tools/test.sh" in readme and "`.ci/run` runs exactly command 2." in readme
    assert "exec bash tools/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
