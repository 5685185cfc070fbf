"""Feedback that guides (issue 24, part 5): a light start, progress bars for the slow steps, refused
reruns that say what changed, "did you mean" for misspelt names, and the masks Parquet in show /
evaluate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "pyarrow", "PIL", "numpy", "torchvision", "safetensors")


def _imported_by(argv: list[str]) -> list[str]:
    """The heavy modules a fresh `tagclip ARGV` process has imported when it exits."""
    code = (
        "import sys\n"
        f"sys.argv = ['tagclip', *{argv!r}]\n"
        "from tagclip_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:', *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1].split()[1:]


@pytest.mark.parametrize("argv", [["--help"], ["annotate", "--help"], ["segment", "--help"], ["show", "--help"],
                                  ["evaluate", "--help"], ["--version"]])
def test_help_imports_no_heavy_module(argv):
    # `tagclip --help` starts in a fraction of a second because torch, open_clip, pyarrow, PIL and
    # numpy are imported only inside the commands that need them
    assert _imported_by(argv) == []
