"""Every relative link in the repository's Markdown leads somewhere: the file or folder exists inside the repository,
and a ``#anchor`` names a heading of the target page. A document cited by name in a code span (```docs/x.md```) must
exist too, so no page sends a reader to a folder that only existed on the author's machine.

Links are read as GitHub renders them: outside fenced code blocks and code spans, inline ``[text](target)`` and
reference definitions ``[label]: target``; anchors are GitHub's heading slugs (lowercase, punctuation dropped,
spaces to ``-``, ``-1``, ``-2`` for repeats). Links with a scheme (``https:``, ``mailto:``) are not fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
#: [text](target) or [text](target "title"); the text may hold code spans and images, not nested brackets
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_CITED_DOCUMENT = re.compile(r"^[^\s`]+\.md$")


@dataclass(frozen=True)
class Link:
    document: Path
    line: int
    target: str
    cited: bool = False  # a code span naming a document, not a link

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO) if self.document.is_relative_to(REPO) else self.document}:{self.line}"


def markdown_files(root: Path) -> list[Path]:
    """The Markdown files of the tree, leaving out hidden folders (.git, .venv, caches)."""
    return sorted(
        path for path in root.rglob("*.md") if not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = _FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def links(document: Path) -> list[Link]:
    found: list[Link] = []
    for number, line in _prose_lines(document.read_text(encoding="utf-8")):
        for span in _CODE_SPAN.finditer(line):
            content = span.group(2).strip()
            if _CITED_DOCUMENT.match(content) and not _SCHEME.match(content):
                found.append(Link(document, number, content, cited=True))
        prose = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        found.extend(Link(document, number, m.group(1)) for m in _INLINE.finditer(prose))
        reference = _REFERENCE.match(prose)
        if reference:
            found.append(Link(document, number, reference.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in _prose_lines(document.read_text(encoding="utf-8")):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
    result: set[str] = set()
    for base, count in seen.items():
        result.add(base)
        result.update(f"{base}-{n}" for n in range(1, count))
    return result


def problem(link: Link, root: Path) -> str | None:
    """Why ``link`` is broken, or None."""
    target = link.target
    if link.cited:
        if target.startswith("/"):
            return f"cites {target}, a path outside the repository"
        if not ((root / target).is_file() or (link.document.parent / target).is_file()):
            return f"cites {target}, which is not in the repository"
        return None
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # external: not fetched in tests
    path_part, _, anchor = target.partition("#")
    if path_part.startswith("/"):
        return f"links to {target}: an absolute path, which leaves the repository on GitHub"
    resolved = (link.document.parent / path_part).resolve() if path_part else link.document
    if not resolved.is_relative_to(root.resolve()):
        return f"links to {target}, outside the repository"
    if not resolved.exists():
        return f"links to {target}, which does not exist"
    if anchor:
        if resolved.is_dir() or resolved.suffix != ".md":
            return f"links to {target}: an anchor into something that is not a Markdown page"
        if anchor not in anchors(resolved):
            return f"links to {target}: {resolved.name} has no heading with the anchor #{anchor}"
    return None


DOCUMENTS = markdown_files(REPO)


def test_the_repository_has_linked_documents() -> None:
    """The test below must have links to check: a parsing slip that found none would pass silently."""
    names = {path.relative_to(REPO).as_posix() for path in DOCUMENTS}
    assert {"README.md", "docs/configuration.md", "rules/README.md", "gateway/incentives/README.md"} <= names
    assert sum(len(links(path)) for path in DOCUMENTS) > 100


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(document: Path) -> None:
    broken = [f"{link.name}: {why}" for link in links(document) if (why := problem(link, REPO)) is not None]
    assert not broken, "\n".join(broken)


# --- the checker itself: each kind of broken link is caught, and what GitHub does not render as a link is not ---


def _tree(tmp_path: Path, page: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Site file (`site.yaml`)\n\n## Notes\n\n## Notes\n")
    (tmp_path / "folder").mkdir()
    document = tmp_path / "docs" / "page.md"
    document.write_text(page)
    return document


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("[a](other.md)\n", None),
        ("[a](other.md#site-file-siteyaml)\n", None),
        ("[a](other.md#notes-1)\n", None),
        ("[a](../folder)\n", None),
        ("[a](https://example.com/missing)\n", None),
        ("# Here\n\n[a](#here)\n", None),
        ("```\n[a](missing.md)\n```\n", None),
        ("`[a](missing.md)`\n", None),
        ("[a](missing.md)\n", "does not exist"),
        ("[a](../missing/)\n", "does not exist"),
        ("[a](other.md#site-file)\n", "no heading with the anchor #site-file"),
        ("[a](other.md#notes-2)\n", "no heading with the anchor #notes-2"),
        ("[a](#nowhere)\n", "no heading with the anchor #nowhere"),
        ("[a](../../outside.md)\n", "outside the repository"),
        ("[a](/work/briefs/readme-rules.md)\n", "absolute path"),
        ("[label]: missing.md\n", "does not exist"),
        ("see `/work/briefs/readme-rules.md`\n", "outside the repository"),
        ("see `docs/missing.md`\n", "not in the repository"),
        ("see `docs/other.md`\n", None),
    ],
)
def test_the_checker_finds_broken_links(tmp_path: Path, page: str, expected: str | None) -> None:
    document = _tree(tmp_path, page)
    problems = [why for link in links(document) if (why := problem(link, tmp_path)) is not None]
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Storage and delivery (`storage:`)", "storage-and-delivery-storage"),
        ("InfluxDB 2 / InfluxDB Cloud (`uplinks.influx`)", "influxdb-2--influxdb-cloud-uplinksinflux"),
        ("Fresh-machine check (`deploy/check-fresh.sh`)", "fresh-machine-check-deploycheck-freshsh"),
        ("The city-platform MQTT contract, version 1", "the-city-platform-mqtt-contract-version-1"),
    ],
)
def test_slugs_follow_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor
