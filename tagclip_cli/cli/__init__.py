"""The `tagclip` command line: parses, validates and delegates. No algorithm lives here.

Each command parses its options and calls a library function with them (annotate and segment:
`tagclip_cli.commands`, whose defaults are the options' defaults); the library raises
`TagclipError`s, which `user_errors` prints as one line with the exit code. Modules: `common`
(app, logging, errors, progress, shared options), `surface` (help panels, placeholders, the old
spellings of renamed options), `run` (the model commands), `outputs` (the commands on our
outputs), `student`.
"""

from __future__ import annotations

import sys

from tagclip_cli.cli import outputs, run, student
from tagclip_cli.cli.common import app, err_console, fail, print_error, setup_logging, user_errors
from tagclip_cli.cli.surface import HAND_OVER, JOBS, LABEL, LOOK, TagclipCommand
from tagclip_cli.errors import TagclipError

__all__ = ["app", "fail", "main", "print_error", "setup_logging", "user_errors"]

# The commands in the order of use, grouped as `tagclip --help` lists them.
COMMANDS = (
    (LABEL, "annotate", run.annotate),
    (LABEL, "segment", run.segment),
    (LOOK, "show", outputs.show),
    (LOOK, "evaluate", outputs.evaluate_command),
    (LOOK, "calibrate", outputs.calibrate),
    (LOOK, "retag", outputs.retag),
    (HAND_OVER, "export", outputs.export_command),
    (HAND_OVER, "train-student", student.train_student_command),
    (HAND_OVER, "student-predict", student.student_predict_command),
    (JOBS, "merge", run.merge),
    (JOBS, "reproduce", run.reproduce),
)
for _panel, _name, _command in COMMANDS:
    app.command(_name, cls=TagclipCommand, rich_help_panel=_panel)(user_errors(_command))


def main() -> None:
    from tagclip_cli.faults import Interrupted, install_signal_handlers

    install_signal_handlers()  # SIGINT / SIGTERM -> Interrupted: finish the current part, exit 130 / 143
    try:
        app()
    except TagclipError as exc:  # raised outside a command (commands print their own: user_errors)
        print_error(str(exc))
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        err_console.print(f"interrupted ({exc}); completed results are kept: rerun the same command to resume",
                          highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
