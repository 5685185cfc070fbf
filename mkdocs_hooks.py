"""mkdocs hook: the command reference (docs/commands.md) generated from the `tagclip` Typer app, so the
page cannot drift from the code.

The app is found from the console script that pyproject.toml declares (`tagclip =
"tagclip_cli.cli:main"`): its module is imported and its Typer app taken by the public name `app`, or
else as the one `typer.Typer` object the module holds, so the hook keeps working whether `cli` is one
module or a package that re-exports the app. Each command's usage line, help text and options come
from the same help records that `tagclip COMMAND --help` prints, hidden options left out, grouped by
their help panel when the app defines panels. Run it by hand to see the generated Markdown:
`python mkdocs_hooks.py`.
"""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MARKER = "<!-- commands: generated from the Typer app by mkdocs_hooks.py -->"
SCRIPT = "tagclip"


def find_app():
    """The Typer app behind the `tagclip` console script of this checkout."""
    import typer

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    target = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"][SCRIPT]
    module = importlib.import_module(target.split(":")[0])
    app = getattr(module, "app", None)
    if isinstance(app, typer.Typer):
        return app
    apps = [value for value in vars(module).values() if isinstance(value, typer.Typer)]
    if len(apps) != 1:
        raise RuntimeError(f"{module.__name__} holds {len(apps)} Typer apps; expected `app` or exactly one")
    return apps[0]


def _text(value: str) -> str:
    """Help text as Markdown: angle brackets, pipes and stars shown as they are, code spans kept."""
    pieces = re.split(r"(`[^`]*`)", value)
    out = []
    for piece in pieces:
        if not piece.startswith("`"):
            piece = piece.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            piece = piece.replace("*", r"\*").replace("_", r"\_").replace("[", r"\[")
        out.append(piece)
    return " ".join("".join(out).split())


def _grouped(items, panel_of) -> dict[str, list]:
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(panel_of(item), []).append(item)
    return groups


def command_markdown(group, name: str, parent_ctx) -> str:
    """One command: heading, help, usage and its visible parameters grouped by help panel."""
    command = group.get_command(parent_ctx, name)
    ctx = command.context_class(command, info_name=name, parent=parent_ctx)
    lines = [f"### `{SCRIPT} {name}`", "", _text(command.help or command.short_help or ""), "",
             "```text", command.get_usage(ctx).strip(), "```", ""]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False) and p.name != "help"]

    def panel(param) -> str:
        default = "Arguments" if type(param).__name__.endswith("Argument") else "Options"
        return getattr(param, "rich_help_panel", None) or default

    for title, members in _grouped(params, panel).items():
        lines += [f"**{title}**", ""]
        for param in members:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            declaration, help_text = record
            lines.append(f"- `{declaration}`: {_text(help_text)}" if help_text else f"- `{declaration}`")
        lines.append("")
    return "\n".join(lines)


def commands_markdown() -> str:
    """The whole reference: the command list (by panel, in the app's order), then each command."""
    import typer

    group = typer.main.get_command(find_app())
    ctx = group.context_class(group, info_name=SCRIPT)
    names = [n for n in group.list_commands(ctx) if not getattr(group.get_command(ctx, n), "hidden", False)]
    lines = ["## All commands", ""]
    by_panel = _grouped(names, lambda n: getattr(group.get_command(ctx, n), "rich_help_panel", None) or "")
    for title, members in by_panel.items():
        if title:
            lines += [f"**{title}**", ""]
        for name in members:
            summary = _text(group.get_command(ctx, name).get_short_help_str(limit=120))
            lines.append(f"- [`{SCRIPT} {name}`](#{SCRIPT}-{name}): {summary}")
        lines.append("")
    lines += ["## Options of each command", ""]
    lines += [command_markdown(group, name, ctx) for name in names]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        return markdown.replace(MARKER, commands_markdown())
    return markdown


if __name__ == "__main__":
    print(commands_markdown())
