"""How the commands present themselves: the help panels, readable placeholders (FILE, DIR, N instead
of `<str>`, `<bool>`, `{out}`), and the old spellings of renamed options.

Every command is a `TagclipCommand` (and the app a `TagclipGroup`): placeholders come from each
option's `metavar`, else from its type (N, FLOAT, TEXT, PATH; none for a flag); arguments show as
their placeholder (`IMAGES`, `[IMAGES]`) in the usage line. An old spelling of a renamed option
(`RENAMED`) is not an option of the command, so it never shows in `--help`: it is rewritten to the
new one before parsing, with one warning line per spelling used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

# Option panels of a command's --help, in this order when a command has them.
INPUT = "Input"
MODEL = "Model"
METHOD = "Method"
OUTPUT = "Output"
JOB = "Job"
SCORING = "Scoring"  # evaluate
SELECTION = "Selection"  # show: which images, in which order
GENERAL = "General"  # --quiet, --verbose, --help: last

# Command panels of `tagclip --help`, in the order of use.
LABEL = "Label"
LOOK = "Look and score"
HAND_OVER = "Hand over"
JOBS = "Jobs"

# Old spellings, per command: still accepted, hidden from --help, one warning each when used.
RENAMED: dict[str, dict[str, str]] = {
    "evaluate": {"-v": "--verbose"},
    "calibrate": {"--pred": "--tags"},
    "train-student": {"--batch": "--batch-size"},
    "student-predict": {"--png-dir": "--out"},
}

# Placeholders by type, for options that name none.
_BY_TYPE = {"int": "N", "float": "FLOAT", "str": "TEXT", "Path": "PATH"}


def warn_renamed(old: str, new: str) -> None:
    """The one line an old spelling prints: `warning: --pred is now --tags`."""
    from tagclip_cli.cli.common import err_console

    err_console.print(f"[yellow]warning:[/] {escape(old)} is now {escape(new)}", markup=True, highlight=False,
                      soft_wrap=True)


def rename_old_options(args: list[str], renamed: Mapping[str, str], takes_value: Iterable[str]) -> list[str]:
    """args with each old spelling (`--old`, `--old=V`) replaced by the new one, warning once per
    spelling. Values of options are skipped (`--title --pred` keeps its title), and so is all after `--`."""
    takes_value = set(takes_value) | {old for old, new in renamed.items() if new in takes_value}
    out: list[str] = []
    warned: set[str] = set()
    skip = False
    for i, arg in enumerate(args):
        if skip:
            out.append(arg)
            skip = False
            continue
        if arg == "--":
            out.extend(args[i:])
            break
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in renamed:
            if name not in warned:
                warn_renamed(name, renamed[name])
                warned.add(name)
            name = renamed[name]
            arg = name + eq + value
        out.append(arg)
        skip = name in takes_value and not eq
    return out


class _Argument(TyperArgument):
    """An argument shown by its placeholder: `IMAGES` (required) or `[IMAGES]`, with no type column."""

    def display_type_rich(self, ctx) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.required else f"[{name}]"


def _readable(params: list) -> None:
    """Give every option a placeholder (none for flags) and every argument an upper-case one."""
    for param in params:
        if isinstance(param, TyperArgument):
            if param.metavar is None:
                param.metavar = param.name.upper()
            param.__class__ = _Argument
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag else _BY_TYPE.get(param.bare_type(), param.bare_type().upper())


def _readable_help_option(option, panel: str | None):
    if option is not None:
        option.metavar = ""
        if panel is not None:
            option.rich_help_panel = panel
    return option


class TagclipCommand(TyperCommand):
    """A command with readable placeholders, --help in the General panel, and its RENAMED spellings."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _readable(self.params)

    def get_help_option(self, ctx):
        return _readable_help_option(super().get_help_option(ctx), GENERAL)

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        renamed = RENAMED.get(self.name or "", {})
        if renamed and not ctx.resilient_parsing:
            takes_value = [o for p in self.get_params(ctx) if isinstance(p, TyperOption) and not p.is_flag
                           and not p.count for o in (*p.opts, *p.secondary_opts)]
            args = rename_old_options(list(args), renamed, takes_value)
        return super().parse_args(ctx, args)


class TagclipGroup(TyperGroup):
    """The app: readable placeholders for its own options (--version, --help)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _readable(self.params)

    def get_help_option(self, ctx):
        return _readable_help_option(super().get_help_option(ctx), None)
