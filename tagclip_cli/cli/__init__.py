"""The `tagclip` command line: parses, validates and delegates. No algorithm lives here.

Each command parses its options and calls a library function with them (annotate and segment:
`tagclip_cli.commands`, whose defaults are the options' defaults); the library raises
`TagclipError`s, which `user_errors` prints as one line with the exit code. Modules: `common`
(app, logging, errors, progress, shared options), `run` (the model commands), `outputs` (the
commands on our outputs), `student`.
"""

from __future__ import annotations

import sys

from tagclip_cli.cli import outputs, run, student
from tagclip_cli.cli.common import app, err_console, fail, print_error, setup_logging, user_errors
from tagclip_cli.errors import TagclipError

__all__ = ["app", "fail", "main", "print_error", "setup_logging", "user_errors"]

# The commands, in the order `tagclip --help` lists them.
COMMANDS = (
    ("evaluate", outputs.evaluate_command),
    ("annotate", run.annotate),
    ("merge", run.merge),
    ("show", outputs.show),
    ("segment", run.segment),
    ("reproduce", run.reproduce),
    ("export", outputs.export_command),
    ("train-student", student.train_student_command),
    ("student-predict", student.student_predict_command),
    ("retag", outputs.retag),
    ("calibrate", outputs.calibrate),
)
for _name, _command in COMMANDS:
    app.command(_name)(user_errors(_command))


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
