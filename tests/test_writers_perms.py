"""Atomic writes leave files with the usual permissions, not mkstemp's 0600."""

from __future__ import annotations

import os

from tagclip_cli.fileio import atomic_path


def test_atomic_output_gets_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "out.json"
        with atomic_path(target) as tmp:
            tmp.write_text("{}")
        assert target.read_text() == "{}"
        assert target.stat().st_mode & 0o777 == 0o644
        assert not list(tmp_path.glob(".out.json.*"))
    finally:
        os.umask(old)
