"""The documentation site: `mkdocs build --strict` passes (no broken link or anchor, every page
builds), every page is in the navigation, and the command reference that mkdocs_hooks.py generates
from the Typer app lists every command and every visible option of the live app."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]


def load_hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    page = (tmp_path / "site" / "commands" / "index.html").read_text(encoding="utf-8")
    assert 'id="tagclip-annotate"' in page and 'id="tagclip-student-predict"' in page
    assert (tmp_path / "site" / "gallery.png").is_file()


def test_every_page_is_in_the_navigation():
    listed = set(re.findall(r"^\s+- [^:]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= listed, f"docs pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed <= pages, f"nav entries without a page: {sorted(listed - pages)}"


def test_command_reference_covers_the_live_app():
    hooks = load_hooks()
    app = hooks.find_app()
    from tagclip_cli.cli import app as cli_app

    assert app is cli_app
    markdown = hooks.commands_markdown()
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="tagclip")
    names = group.list_commands(ctx)
    assert {"annotate", "segment", "show", "evaluate", "export"} <= set(names)
    for name in names:
        command = group.get_command(ctx, name)
        assert f"### `tagclip {name}`" in markdown
        section = markdown.split(f"### `tagclip {name}`", 1)[1].split("\n### ", 1)[0]
        declared = {part.split()[0] for decl in re.findall(r"^- `([^`]*)`", section, re.M) for part in decl.split(", ")}
        for param in command.params:
            names_of = set(param.opts) | set(param.secondary_opts)
            if type(param).__name__.endswith("Argument"):  # listed by its displayed name (e.g. FORMAT)
                sub = command.context_class(command, info_name=name, parent=ctx)
                names_of = {param.get_help_record(sub)[0].split()[0]}
            if param.hidden or param.name == "help":
                assert not names_of & declared, (name, param.opts)
            else:
                assert names_of & declared, (name, param.name, sorted(declared))

def test_help_text_is_escaped_for_markdown():
    hooks = load_hooks()
    assert hooks._text("a 'class<TAB>threshold' line") == "a 'class&lt;TAB&gt;threshold' line"
    assert hooks._text("keep `x<y>` as code, 0.0<=x") == "keep `x<y>` as code, 0.0&lt;=x"
    assert hooks._text("*.jpg [default: 2]") == r"\*.jpg \[default: 2]"
