"""Every ```python block of README.md runs as written.

Each block runs on its own (a fresh interpreter, an empty working folder, nothing
downloaded), as a reader who pastes it would run it: a block must define what it uses.
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^[ \t]*```(?:python|py)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` for each ```python block of ``text``."""
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(1)))
            for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_the_fence_pattern_finds_every_block():
    """The parametrised test below cannot pass by finding nothing: the README has code, and
    every opening ```python fence is matched (none skipped by a spacing variant)."""
    text = README.read_text()
    opening = re.findall(r"^[ \t]*```(?:python|py)\b", text, re.M)
    assert BLOCKS and len(BLOCKS) == len(opening)
    assert python_blocks("x\n```python\nprint(1)\n```\n") == [(2, "print(1)\n")]


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(tmp_path, line, code):
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, f"README.md block at line {line} failed:\n{run.stderr[-4000:]}"
