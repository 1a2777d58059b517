"""The command examples in README.md, docs/*.md and the other READMEs (drivers, rules, gateway parts, deploy) run as
written.

A fenced block right after ``<!-- runnable -->`` (blank lines between are allowed) is run with bash from the
repository's root, ``edge-gateway`` on the PATH (this interpreter's), ``set -e -o pipefail``, and must exit 0. A
block right after ``<!-- output -->`` is the exact standard output of the nearest runnable block above it. Blocks
without a marker are illustrations (placeholders such as ``SITE.yaml``, real hardware, commands that run until
stopped) and are only parsed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted(path for path in REPO.glob("*/**/README.md") if not path.relative_to(REPO).parts[0].startswith(".")),
]
#: the pages the runnable examples live on since the README was split into docs/ (issue 13): a page that lost its
#: markers would otherwise leave its examples unrun without a failure
PAGES_WITH_EXAMPLES = {"README.md", "docs/rules.md", "docs/operations.md"}
RUNNABLE = "<!-- runnable -->"
OUTPUT = "<!-- output -->"
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
#: seconds one block may take (each is a few CLI calls)
BLOCK_TIMEOUT = 30


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # 1-based line of the opening fence
    marker: str | None
    text: str
    output: str | None = None  # the expected stdout, for a runnable block followed by an output block

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def fenced_blocks(document: Path) -> list[Block]:
    """Every fenced block of ``document`` with the marker on the nearest non-blank line above its fence."""
    lines = document.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        indent = len(fence["indent"])
        above = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = above if above in (RUNNABLE, OUTPUT) else None
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and not re.match(r"^\s*```\s*$", lines[index]):
            body.append(lines[index][indent:] if lines[index][:indent].isspace() else lines[index].lstrip())
            index += 1
        assert index < len(lines), f"{document}:{start + 1}: fenced block never closed"
        index += 1
        blocks.append(Block(document, start + 1, marker, "\n".join(body) + "\n"))
    return blocks


def runnable_blocks() -> list[Block]:
    found: list[Block] = []
    for document in DOCUMENTS:
        last_runnable: int | None = None
        for block in fenced_blocks(document):
            if block.marker == RUNNABLE:
                found.append(block)
                last_runnable = len(found) - 1
            elif block.marker == OUTPUT:
                assert last_runnable is not None, f"{block.name}: an output block with no runnable block above it"
                owner = found[last_runnable]
                assert owner.output is None, f"{block.name}: {owner.name} already has an output block"
                found[last_runnable] = Block(owner.document, owner.line, owner.marker, owner.text, block.text)
    return found


BLOCKS = runnable_blocks()


def test_the_documents_mark_their_runnable_examples() -> None:
    """Markers that drift away from their block would silently turn the test below into nothing."""
    names = {block.document.relative_to(REPO).as_posix() for block in BLOCKS}
    assert names >= PAGES_WITH_EXAMPLES, sorted(names)
    assert len(BLOCKS) >= 4, [block.name for block in BLOCKS]
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        marked = sum(line.strip() in (RUNNABLE, OUTPUT) for line in lines)
        blocks = [b for b in fenced_blocks(document) if b.marker is not None]
        assert marked == len(blocks), f"{document.name}: a marker is not directly above a fenced block"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_runnable_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # a default data directory under the test's own directory, never the user's real one
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "TMPDIR": str(tmp_path),
    }
    env.pop("STATE_DIRECTORY", None)
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.text],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{block.text}\n{done.stdout}{done.stderr}"
    if block.output is not None:
        assert done.stdout == block.output, f"{block.name}: the output shown below it is not what it prints"
