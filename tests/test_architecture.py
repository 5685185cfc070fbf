"""The layering rules of docs/architecture.md, checked on every import in tagclip_cli/ (function-level
imports included), so a shortcut across a layer fails the suite instead of drifting in: the "may import"
table of the doc (each module's imports of ours within its row), and the forbidden lines below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tagclip_cli"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# Layers, by module name relative to the package (a package name covers its submodules).
ALGORITHM = ("tagclip", "methods", "quirks", "piaa")
BACKBONE = ("backbone",)
DECODING = ("data", "sources", "sourcebase", "shardsources", "tarscan")
OUR_FILES = ("writers", "formats", "evaluate", "export")
ORCHESTRATION = ("cli", "api", "commands", "pipeline", "piaajob", "jobs", "show", "reproduce")

# module group -> what it must never import
RULES: dict[tuple[str, ...], tuple[str, ...]] = {
    # The method is pure tensor code: no CLI, no file formats, no jobs.
    ALGORITHM: ORCHESTRATION + OUR_FILES + ("pyarrow",),
    # The backbone knows open_clip, not the method that runs on it.
    BACKBONE: ALGORITHM + ORCHESTRATION + ("formats", "evaluate", "export"),
    # Reading and writing our files needs no model.
    OUR_FILES: BACKBONE + ALGORITHM + ("cli", "pipeline", "jobs"),
    # Sources and decoding know nothing of the method.
    DECODING: ALGORITHM + BACKBONE + ("cli", "pipeline", "evaluate", "export"),
    # The label rule shared by segment and evaluate --cams: no model, no method, no file formats.
    ("cams",): BACKBONE + ALGORITHM + ORCHESTRATION + OUR_FILES + DECODING,
    # Only the entry point imports the CLI; the Python API and the commands' functions sit under it.
    ("pipeline", "jobs", "show", "vocab", "errors", "faults", "synthetic"): ("cli",),
    ("api", "commands"): ("cli",),
    ("commands",): ("api",),
    # The defaults are read by the command line before torch is imported: they import nothing of ours.
    ("defaults",): ALGORITHM + BACKBONE + DECODING + OUR_FILES + ORCHESTRATION + ("cams", "vocab", "errors"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module path imports, at any depth of the file, relative imports resolved."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(["tagclip_cli", *here[: len(here) - node.level + 1]])
                if node.module:
                    found.add(f"{base}.{node.module}")
                else:  # from . import x: each name is a module
                    found.update(f"{base}.{alias.name}" for alias in node.names)
            elif node.module == "tagclip_cli":  # from tagclip_cli import errors: the module errors
                found.update(_package_member(alias.name) for alias in node.names)
            else:
                found.add(node.module or "")
    return found


def _package_member(name: str) -> str:
    """`from tagclip_cli import name`: the submodule `name` when there is one, else the package."""
    is_module = (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()
    return f"tagclip_cli.{name}" if is_module else "tagclip_cli"


def in_group(name: str, group: tuple[str, ...]) -> bool:
    """Whether a dotted module name (ours without the tagclip_cli prefix, or a third-party one) is in
    the group."""
    return any(name == g or name.startswith(g + ".") for g in group)


def local(name: str) -> str:
    return name.removeprefix("tagclip_cli.") if name.startswith("tagclip_cli.") else name


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_rules_cover_existing_modules():
    """A rule naming a module that does not exist is a typo that silently checks nothing."""
    names = {module_name(p).split(".")[0] for p in SOURCES}
    optional = {"sources", "export"}  # layers other issues add; listed so they start constrained
    for group, forbidden in RULES.items():
        for name in group + forbidden:
            if name != "pyarrow":
                assert name in names or name in optional, name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_layers(path):
    me = module_name(path)
    violations = []
    for group, forbidden in RULES.items():
        if not in_group(me, group):
            continue
        for target in imported_modules(path):
            name = local(target)
            ours = target.startswith("tagclip_cli") or target == "pyarrow" or target.startswith("pyarrow.")
            if ours and in_group(name, forbidden) and not in_group(name, group):
                violations.append(f"{me} imports {target}")
    assert not violations, violations


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "tagclip_cli"
    pkg.mkdir()
    mod = pkg / "segment.py"
    mod.write_text("def f():\n    from tagclip_cli.writers import x\n    from . import cli\n", encoding="utf-8")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert imported_modules(mod) == {"tagclip_cli.writers", "tagclip_cli.cli"}
    finally:
        PACKAGE = saved


# ---- the "may import" table of docs/architecture.md ---------------------------------------------

def may_import_table(text: str) -> dict[str, set[str] | None]:
    """module -> the modules of ours it may import (None: anything), from the table's rows.

    A row's module is its first cell (`cli.py`, `backbone/`); the allowed names are those in
    backticks in the last cell before its first ";" (after it come the bans, in words)."""
    table: dict[str, set[str] | None] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        module = cells[0].strip("`").removesuffix(".py").removesuffix("/")
        allowed = cells[2].split(";")[0]
        table[module] = None if allowed == "anything" else set(re.findall(r"`([a-z_]+)`", allowed))
    return table


TABLE = may_import_table(ARCHITECTURE.read_text(encoding="utf-8"))


def test_table_has_a_row_for_every_module_and_no_other():
    modules = {module_name(p).split(".")[0] for p in SOURCES} - {""}
    assert set(TABLE) == modules
    for allowed in TABLE.values():
        assert allowed is None or allowed <= modules, allowed - modules


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_are_within_the_table_row(path):
    me = module_name(path).split(".")[0]
    if not me:  # the package's __init__: the public surface, above every layer
        return
    allowed = TABLE[me]
    if allowed is None:
        return
    outside = sorted(
        target for target in imported_modules(path)
        if target.startswith("tagclip_cli.") and local(target).split(".")[0] not in allowed | {me}
    )
    assert not outside, f"{me} may import {sorted(allowed)} (docs/architecture.md), not {outside}"


def test_table_parser_reads_rows_and_bans():
    text = (
        "| module | owns | may import (ours) |\n|---|---|---|\n"
        "| `cli.py` | commands | anything |\n"
        "| `data.py` | decoding | `sources`, `fileio` (text escaping); never `backbone` |\n"
        "| `errors.py` | exceptions | nothing |\n"
    )
    assert may_import_table(text) == {"cli": None, "data": {"sources", "fileio"}, "errors": set()}
