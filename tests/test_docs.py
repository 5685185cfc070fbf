"""docs/algorithm.md is the spec the code cites: its sections and quirks exist, every citation in
the code resolves to one, nothing points at the old out-of-tree spec, and every branch on
`reference_compat` names the quirk it reproduces (docs/algorithm.md §10)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "algorithm.md"
CITING_DIRS = ("tagclip_cli", "tests", "benchmarks")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".toml", ".html", ".css", ".js"}
# Files whose branches on the flag must cite a quirk: the algorithm package and the naive oracle.
BRANCHING_FILES = sorted((ROOT / "tagclip_cli").rglob("*.py")) + [ROOT / "benchmarks" / "naive.py"]
# "docs/algorithm.md §3", "docs/algorithm.md §2-§6", "docs/algorithm.md §8, §9"
SECTION_CITATION = re.compile(r"docs/algorithm\.md((?:\s*[-,–]?\s*§\d+)+)")
QUIRK = re.compile(r"\bQ\d+\b")
FLAG = re.compile(r"^(reference_compat|fp16_round\w*|q\d_\w+)$")  # q1_fp16_positions: quirks.Quirks


def spec_headings() -> set[str]:
    """The anchors of the spec: "§3" from "## §3 DMAR ...", "Q2" from "### Q2 ..."."""
    return set(re.findall(r"^#{2,3} (§\d+|Q\d+)\b", SPEC.read_text(encoding="utf-8"), flags=re.MULTILINE))


def text_files() -> list[Path]:
    files = []
    for top in CITING_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def test_spec_has_the_agreed_numbering():
    expected = {f"§{n}" for n in range(14)} | {f"Q{n}" for n in range(1, 6)}
    assert expected <= spec_headings()


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_citations_resolve(path: Path):
    text = path.read_text(encoding="utf-8", errors="replace")
    cited = {s for group in SECTION_CITATION.findall(text) for s in re.findall(r"§\d+", group)}
    cited |= set(QUIRK.findall(text))
    assert cited <= spec_headings(), f"{path.name} cites {sorted(cited - spec_headings())}, not in {SPEC.name}"


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_to_the_old_spec(path: Path):
    if path == Path(__file__).resolve():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    stale = [i for i, line in enumerate(lines, 1) if "ALGORITHM.md" in line]
    assert not stale, f"{path.name} lines {stale} point at ALGORITHM.md: cite docs/algorithm.md §N instead"


def flag_branch_lines(source: str) -> list[int]:
    """Line numbers of every `if` / `elif` / conditional expression whose test reads the flag."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If | ast.IfExp):
            names = [getattr(n, "id", None) or getattr(n, "attr", "") for n in ast.walk(node.test)]
            if any(FLAG.match(name) for name in names):
                lines.append(node.test.lineno)
    return sorted(lines)


@pytest.mark.parametrize("path", BRANCHING_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_reference_compat_branches_cite_their_quirk(path: Path):
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    uncited = [n for n in flag_branch_lines(source) if not QUIRK.search("\n".join(lines[max(0, n - 3) : n + 2]))]
    assert not uncited, f"{path.name} lines {uncited} branch on reference_compat (or fp16_round) with no quirk Qn cited"


CODE_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:\([^`]*\))?`")


def test_code_names_in_the_spec_exist():
    """The spec names the functions that implement each step; a rename must update it."""
    files = [p for d in ("tagclip_cli", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    code = "\n".join(p.read_text(encoding="utf-8") for p in files)
    defined = set(re.findall(r"\b(?:def|class)\s+([A-Za-z_][A-Za-z0-9_]*)", code)) | set(
        re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[:=]", code, flags=re.M)
    )
    names = {m.group(1) for m in CODE_NAME.finditer(SPEC.read_text(encoding="utf-8"))}
    # Only names that look like code (a dot, an underscore or CamelCase), not symbols such as `N` or `p`.
    looks_like_code = {n for n in names if "." in n or "_" in n or re.search(r"[a-z][A-Z]", n)}
    external = ("F.", "cv2.", "torch.", "open_clip.", "np.")  # other libraries' names, and file names
    missing = sorted(
        n for n in looks_like_code - {"is_grads_batched"}  # a torch.autograd.grad argument
        if n.split(".")[-1] not in defined and not n.startswith(external) and not n.endswith((".py", ".md", ".txt"))
    )
    assert not missing, f"{SPEC.name} names code that does not exist: {missing}"
