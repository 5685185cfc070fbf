"""cli.py in-process: the logging options of every command and the one error printer."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from tagclip_cli.cli import app, print_error
from tagclip_cli.errors import TagclipError, UsageError, VocabularyError


@pytest.mark.parametrize("command", ["annotate", "segment", "evaluate", "merge", "show"])
def test_every_command_has_the_long_verbose_option(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--verbose" in result.output


def test_short_v_is_vocab_where_there_is_a_vocabulary_and_an_old_spelling_of_verbose_in_evaluate(tmp_path):
    runner = CliRunner()
    # annotate / segment: -v names the vocabulary (a missing file is reported as a vocabulary file)
    result = runner.invoke(app, ["annotate", str(tmp_path), "-v", str(tmp_path / "v.txt"), "--out",
                                 str(tmp_path / "o.parquet")])
    assert result.exit_code == 2 and "v.txt: no such vocabulary file" in result.output
    # evaluate: -v is still accepted as --verbose, with a warning (not listed in its help any more)
    result = runner.invoke(app, ["evaluate", "-v", "--gt", "nope", "--root", ".", "--tags", "p.parquet"])
    assert result.exit_code == 2 and "--gt must be one of" in result.output
    assert "warning: -v is now --verbose" in result.output
    help_text = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200"}).output
    assert "--verbose" in help_text and re.search(r"\s-v\s", help_text) is None


def test_error_messages_are_printed_literally(capsys):
    print_error("cannot read [bold]x[/bold].jpg; pip install 'tagclip-cli[crf]'")
    assert capsys.readouterr().err.strip() == "error: cannot read [bold]x[/bold].jpg; pip install 'tagclip-cli[crf]'"


def test_vocabulary_errors_are_usage_errors():
    assert issubclass(VocabularyError, UsageError) and issubclass(VocabularyError, TagclipError)
    assert issubclass(VocabularyError, ValueError)  # as before: `except ValueError` still catches it
    assert VocabularyError("v.txt: empty").exit_code == 2
