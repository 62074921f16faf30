"""Every relative Markdown link in README.md, docs/*.md and the benchmark notes points at a file (or folder) of the
repository, and every `#anchor` into a Markdown file names one of its headings.

"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: the Markdown files whose links are checked (globs relative to the repository root)
DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/README.md", "benchmarks/results/archive/INDEX.md")

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", flags=re.S)
# [text](target "title") and ![alt](target); the text may hold one level of brackets (e.g. [`a[0]`](x))
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", flags=re.M)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def documents() -> list[Path]:
    found = sorted({path for pattern in DOCUMENTS for path in REPO.glob(pattern) if path.is_file()})
    return found


def prose(text: str) -> str:
    """The text without fenced code blocks, inline code and HTML comments (links there are not links)."""
    text = FENCE.sub("", text)
    text = HTML_COMMENT.sub("", text)
    return INLINE_CODE.sub("", text)


def links(text: str) -> list[str]:
    body = prose(text)
    return [*INLINE_LINK.findall(body), *REFERENCE_LINK.findall(body)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, formatting and punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    heading = heading.strip().lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def problems(document: Path) -> list[str]:
    found = []
    for target in links(document.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        if not path_part:  # a link to a heading of this file
            resolved = document
        else:
            resolved = (document.parent / path_part).resolve()
            if not resolved.is_relative_to(REPO):
                found.append(f"{target}: outside the repository")
                continue
            if not resolved.exists():
                found.append(f"{target}: no such file ({resolved.relative_to(REPO)})")
                continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            found.append(f"{target}: no heading #{fragment} in {resolved.relative_to(REPO)}")
    return found


def test_the_documents_exist():
    names = {str(path.relative_to(REPO)) for path in documents()}
    assert "README.md" in names, f"no README.md under REPO={REPO}"
    assert any(name.startswith("docs/") for name in names), f"no docs/*.md under REPO={REPO}"


@pytest.mark.parametrize("document", documents(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_of_the_repository(document):
    assert not problems(document), "\n".join(problems(document))


def test_the_checker_sees_a_broken_link(tmp_path, monkeypatch):
    """The checker itself: a missing file, a link out of the repository and a missing anchor are reported;
    links in code, external links and good anchors are not."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "present.md").write_text("# A heading\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](../present.md) [ok](../present.md#a-heading) [ok](#local) [web](https://example.com)\n"
        "`[in code](missing.md)`\n```\n[in a fence](missing.md)\n```\n"
        "[gone](missing.md) [out](../../elsewhere.md) [anchor](../present.md#nope)\n## Local\n"
    )
    reported = problems(page)
    assert len(reported) == 3, reported
    assert any("missing.md" in line for line in reported)
    assert any("outside the repository" in line for line in reported)
    assert any("#nope" in line for line in reported)
