"""`tagclip annotate` in subprocesses on bad inputs and under faults.

- a generated corpus of broken and unusual files: every file has a row with a specific reason, the
  good ones are labelled, exit code 1; --fail-fast stops at the first failure;
- bad vocabularies and arguments: one line on stderr, exit code 2, nothing written;
- SIGINT / SIGTERM to the whole process group: exit 130 / 143, completed parts kept, the rerun
  equals an uninterrupted run; SIGKILL at several random moments, likewise;
- a real full disk (a small tmpfs, where mounting is allowed).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from bad_images import NON_UTF8_ID, make_bad_corpus, noise, restore_permissions
from PIL import Image

VOCAB = "cat\ndog = dog animal\n[background]\nsky\n"


def env_for(cache: Path) -> dict:
    return dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200")


def tagclip(*args: str, cache: Path, expect: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True, env=env_for(cache), timeout=600
    )
    if expect is not None:
        assert proc.returncode == expect, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a refused run (and proof that there is only one)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0][len("error: ") :]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "vocab.txt").write_text(VOCAB)
    return root


@pytest.fixture(scope="module")
def cache(workdir) -> Path:
    return workdir / "cache"


@pytest.fixture(scope="module")
def corpus(workdir):
    root = workdir / "corpus"
    expect = make_bad_corpus(root)
    yield root, expect
    restore_permissions(root)


def annotate_args(images: Path, out: Path, checkpoint: Path, vocab: Path, *extra: str) -> list[str]:
    return ["annotate", str(images), "--vocab", str(vocab), "--out", str(out), "--checkpoint", str(checkpoint), *extra]


# ---- the bad-file corpus ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_run(corpus, workdir, tiny_checkpoint, cache):
    root, expect = corpus
    out = workdir / "corpus.parquet"
    proc = tagclip(
        *annotate_args(
            root, out, tiny_checkpoint, workdir / "vocab.txt", "--workers", "1", "--batch-size", "3", "--max-side", "32"
        ),
        cache=cache,
        expect=1,
    )
    return out, proc


def test_every_bad_file_is_accounted_for_and_the_good_ones_labelled(corpus, corpus_run):
    _, expect = corpus
    out, proc = corpus_run
    rows = {r["image_id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == set(expect)
    failed = 0
    for image_id, outcome in expect.items():
        row = rows[image_id]
        assert row["status"] == outcome.status, (image_id, row["error"])
        if outcome.status == "ok":
            assert row["error"] is None
            assert (row["width"], row["height"]) == outcome.size, image_id  # EXIF rotation applied
            assert len(row["scores"]) == 2 and all(np.isfinite(row["scores"]))
            assert set(row["tags"]) <= {"cat", "dog"} and row["tags"]
        else:
            failed += 1
            assert outcome.reason in row["error"], (image_id, row["error"])
            assert row["scores"] is None and row["tags"] == []
            assert f"failed: {image_id}: {row['error']}" in " ".join(proc.stderr.split())
    assert rows[NON_UTF8_ID]["path"].endswith("caf\\xe9.png")
    ok = len(expect) - failed
    assert f"{ok} done, 0 skipped (already done), {failed} failed" in proc.stderr
    # good.jpg (64x48) and exif_rotated.jpg (20x40 once rotated) are the images above --max-side 32
    assert "2 image(s) longer than --max-side 32 px were downscaled" in " ".join(proc.stderr.split())


def test_fail_fast_stops_at_the_first_bad_file(corpus, workdir, tiny_checkpoint, cache):
    root, _ = corpus
    out = workdir / "fail_fast.parquet"
    proc = tagclip(
        *annotate_args(
            root, out, tiny_checkpoint, workdir / "vocab.txt", "--workers", "0", "--batch-size", "1", "--fail-fast"
        ),
        cache=cache,
        expect=1,
    )
    # In sorted order the first bad file is bomb.png (after UPPER.JPG, animated.gif, animated.webp);
    # with --batch-size 1 the run stops at the end of its 4-image window.
    assert "failed: bomb.png: image too large" in proc.stderr
    assert "stopped at the first failure (--fail-fast)" in " ".join(proc.stderr.split())
    assert not out.exists()
    parts = sorted(Path(f"{out}.parts").glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert [r["image_id"] for r in rows] == ["UPPER.JPG", "animated.gif", "animated.webp", "bomb.png"]


def test_segment_accounts_for_every_bad_file_too(corpus, workdir, tiny_checkpoint, cache):
    from pycocotools.coco import COCO

    root, expect = corpus
    out = workdir / "corpus_masks.json"
    proc = tagclip(
        "segment",
        str(root),
        "--vocab",
        str(workdir / "vocab.txt"),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--workers",
        "1",
        "--batch-size",
        "3",
        "--max-side",
        "32",
        cache=cache,
        expect=1,
    )
    coco = COCO(str(out))
    images = {img["tagclip_image_id"]: img for img in coco.dataset["images"]}
    assert set(images) == set(expect) and len(coco.dataset["images"]) == len(expect)
    for image_id, outcome in expect.items():
        img = images[image_id]
        assert img["tagclip_status"] == outcome.status, (image_id, img)
        if outcome.status == "ok":
            assert (img["width"], img["height"]) == outcome.size, image_id
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
                assert ann["segmentation"]["size"] == [img["height"], img["width"]]
        else:
            assert outcome.reason in img["tagclip_error"], (image_id, img)
            assert coco.getAnnIds(imgIds=[img["id"]]) == []
    failed = sum(o.status == "failed" for o in expect.values())
    assert f"{len(expect) - failed} done, 0 skipped (already done), {failed} failed" in proc.stderr


# ---- bad vocabularies and arguments ------------------------------------------------------------------


@pytest.mark.slow  # eleven CLI start-ups
def test_bad_vocabularies_and_arguments_fail_in_one_line_and_write_nothing(
    corpus, corpus_run, workdir, tiny_checkpoint, cache, tmp_path
):
    root, _ = corpus
    done_out, _ = corpus_run
    vocab = workdir / "vocab.txt"
    files = {
        "empty.txt": "# nothing here\n\n",
        "dup.txt": "cat\ndog\n\nCat\n",
        "bg_dup.txt": "cat\ndog\n[background]\nsky\ndog\n",
        "bg_list.txt": "sky\ncat\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "a_directory.parquet").mkdir()
    out = tmp_path / "out.parquet"
    before = sorted(p.name for p in tmp_path.iterdir())
    done_bytes = done_out.read_bytes()

    cases = [
        (
            annotate_args(root, out, tiny_checkpoint, tmp_path / "empty.txt"),
            f"{tmp_path / 'empty.txt'}: the vocabulary is empty; it needs at least one foreground class",
        ),
        (
            annotate_args(root, out, tiny_checkpoint, tmp_path / "dup.txt"),
            f"{tmp_path / 'dup.txt'}:4: duplicate class 'Cat' (same as 'cat' once case and spacing are ignored), "
            "first on line 1",
        ),
        (
            annotate_args(root, out, tiny_checkpoint, tmp_path / "bg_dup.txt"),
            f"{tmp_path / 'bg_dup.txt'}:5: background class 'dog' is also a foreground class ('dog' on line 2)",
        ),
        (
            annotate_args(root, out, tiny_checkpoint, vocab, "--background", str(tmp_path / "bg_list.txt")),
            f"{tmp_path / 'bg_list.txt'}:2: background class 'cat' is also a foreground class ('cat')",
        ),
        (
            annotate_args(root, out, tiny_checkpoint, tmp_path / "missing.txt"),
            f"{tmp_path / 'missing.txt'}: no such vocabulary file",
        ),
        (
            annotate_args(tmp_path / "no_images_here", out, tiny_checkpoint, vocab),
            f"{tmp_path / 'no_images_here'}: no such file or directory",
        ),
        (annotate_args(root, out, tmp_path / "nope.pt", vocab), f"{tmp_path / 'nope.pt'}: checkpoint file not found"),
        (
            annotate_args(root, tmp_path / "no_dir" / "out.parquet", tiny_checkpoint, vocab),
            f"{tmp_path / 'no_dir'}: output directory does not exist",
        ),
        (
            annotate_args(root, tmp_path / "a_directory.parquet", tiny_checkpoint, vocab),
            f"{tmp_path / 'a_directory.parquet'}: is a directory; --out needs a file name",
        ),
        # A directory nobody can create files in, even root: /proc.
        (
            annotate_args(root, Path("/proc/out.parquet"), tiny_checkpoint, vocab),
            "/proc: cannot create files in the output directory",
        ),
        # The finished corpus output, asked for again with another vocabulary.
        (
            annotate_args(root, done_out, tiny_checkpoint, vocab, "--no-background", "--workers", "0", "--quiet"),
            f"{done_out}: output exists (made with other settings: --background/--no-background: ",
        ),
    ]
    for args, message in cases:
        proc = tagclip(*args, cache=cache, expect=2)
        assert error_line(proc).startswith(message), (args, proc.stderr)
    assert error_line(proc).endswith("background scoring (--no-background): on -> off; --max-side: 32 -> 1024); "
                                     "pass --overwrite to replace it")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a work directory
    assert done_out.read_bytes() == done_bytes and not Path(f"{done_out}.parts").exists()


def test_error_text_that_looks_like_rich_markup_is_printed_as_it_is(workdir, cache, tmp_path):
    """A file name such as `[bold]draft[/bold]` is the user's text, not styling: every error line
    (the commands' own and main()'s) goes through one escaping printer."""
    missing = tmp_path / "[bold]draft[/bold].parquet"
    proc = tagclip("merge", str(missing), cache=cache, expect=2)
    assert error_line(proc) == f"{missing}.parts: no such work directory; nothing to merge"
    vocab = tmp_path / "[red]classes[/].txt"
    proc = tagclip("annotate", str(workdir), "--vocab", str(vocab), "--out", str(tmp_path / "x.parquet"), cache=cache,
                   expect=2)  # a VocabularyError: a usage error, exit 2 as before
    assert error_line(proc).startswith(f"{vocab}: no such vocabulary file (built-in names: ")


def test_unusual_vocabulary_is_accepted_with_warnings(workdir, tiny_checkpoint, cache, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(noise(32, 32)).save(images / "a.png")
    long_name = " ".join(["zebra"] * 80)
    (tmp_path / "odd.txt").write_text(f"# comment\n\ncaf\u00e9  # trailing comment\n{long_name}\n\n")
    out = tmp_path / "odd.parquet"
    proc = tagclip(*annotate_args(images, out, tiny_checkpoint, tmp_path / "odd.txt", "--workers", "0"), cache=cache)
    text = " ".join(proc.stderr.split())
    assert "1 class name(s) with non-ASCII characters ('caf\u00e9')" in text
    assert text.count("is longer than the 77-token text context; its prompts are truncated") == 1
    row = pq.read_table(out).to_pylist()[0]
    assert row["status"] == "ok" and len(row["scores"]) == 2


# ---- signals and kills ---------------------------------------------------------------------------------

N_SIGNAL_IMAGES = 16


@pytest.fixture(scope="module")
def signal_images(workdir) -> Path:
    root = workdir / "signal_images"
    root.mkdir()
    for i in range(N_SIGNAL_IMAGES):
        Image.fromarray(noise(32, 48, seed=200 + i)).save(root / f"im{i:02d}.png")
    (root / "im05b.png").write_bytes(b"not a png")
    return root


def signal_args(images: Path, out: Path, checkpoint: Path, vocab: Path) -> list[str]:
    # 2 images per batch -> windows of 8 images; one part file per window.
    return annotate_args(
        images, out, checkpoint, vocab, "--batch-size", "2", "--part-size", "1", "--workers", "1", "--no-background"
    )


@pytest.fixture(scope="module")
def signal_reference(signal_images, workdir, tiny_checkpoint, cache):
    out = workdir / "signal_reference.parquet"
    tagclip(*signal_args(signal_images, out, tiny_checkpoint, workdir / "vocab.txt"), cache=cache, expect=1)
    return pq.read_table(out)


def start(args: list[str], cache: Path) -> subprocess.Popen:
    # A session of its own, so that a signal can go to the whole group (workers included) like a
    # terminal's Ctrl-C or a cluster's preemption.
    return subprocess.Popen(
        [sys.executable, "-m", "tagclip_cli", *args],
        env=env_for(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_part(proc: subprocess.Popen, parts: Path, count: int = 1, timeout: float = 300) -> bool:
    """Wait until `count` part files are visible; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while len(list(parts.glob("part-*.parquet"))) < count:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return True


def assert_parts_readable(parts: Path) -> int:
    """Every visible part is a complete Parquet file (temp files are dot files); returns their rows."""
    rows = 0
    for part in parts.glob("part-*.parquet"):
        rows += pq.read_table(part).num_rows
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_exit_cleanly_and_resume(
    signum, code, signal_images, signal_reference, workdir, tiny_checkpoint, cache, tmp_path
):
    out = tmp_path / "sig.parquet"
    parts = Path(f"{out}.parts")
    args = signal_args(signal_images, out, tiny_checkpoint, workdir / "vocab.txt")
    proc = start(args, cache)
    try:
        assert wait_for_part(proc, parts), proc.stderr.read()
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    assert f"interrupted ({name}); completed results are kept: rerun the same command to resume" in stderr
    assert not out.exists()
    assert 8 <= assert_parts_readable(parts) < N_SIGNAL_IMAGES + 1
    # The broken file (index 5) is in the first part: the resumed run did not meet it, but the
    # output has it, so the exit code is still 1.
    resumed = tagclip(*args, cache=cache, expect=1)
    assert "0 failed (+1 failed in the earlier run)" in resumed.stderr
    assert pq.read_table(out).equals(signal_reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_one_run(
    signal_images, signal_reference, workdir, tiny_checkpoint, cache, tmp_path
):
    out = tmp_path / "killed.parquet"
    parts = Path(f"{out}.parts")
    args = signal_args(signal_images, out, tiny_checkpoint, workdir / "vocab.txt")
    rng = random.Random(7)
    kills = 0
    for moment in ("start-up", "after a part", "after a part"):
        proc = start(args, cache)
        try:
            if moment == "start-up":
                time.sleep(rng.uniform(0.5, 3.0))
            else:  # a little after the next part appears: mid-window, or during the next write
                done_before = len(list(parts.glob("part-*.parquet")))
                wait_for_part(proc, parts, count=done_before + 1)
                time.sleep(rng.uniform(0.0, 0.5))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
        finally:
            proc.communicate(timeout=120)
        # At every moment: the output is absent or complete (a kill can land after its atomic
        # rename), and every visible part is complete.
        if out.exists():
            assert pq.read_table(out).equals(signal_reference)
        if parts.exists():
            assert_parts_readable(parts)
    assert kills >= 2
    if parts.exists() or not out.exists():  # not finished, or killed while removing the parts
        tagclip(*args, cache=cache, expect=1)
    assert pq.read_table(out).equals(signal_reference)
    assert not parts.exists()


# ---- a real full disk ------------------------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(signal_images, signal_reference, workdir, tiny_checkpoint, cache, tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip(
            "needs root with mount permission for a tmpfs (the injected-ENOSPC test in "
            "tests/test_hardening.py covers the logic everywhere)"
        )
    try:
        out = disk / "labels.parquet"
        parts = Path(f"{out}.parts")
        args = signal_args(signal_images, out, tiny_checkpoint, workdir / "vocab.txt")
        proc = start(args, cache)
        try:
            assert wait_for_part(proc, parts), proc.stderr.read()
            fill(disk / "filler")  # the disk is full from now on: the next part cannot be written
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 2, stderr
        assert "Traceback" not in stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, stderr
        assert "(no space left on device); the 1 parts written before are intact in" in errors[0]
        assert errors[0].endswith("free some space and rerun the same command to resume")
        assert assert_parts_readable(parts) == 8
        assert not out.exists() and not list(parts.glob(".*.tmp"))
        (disk / "filler").unlink()
        tagclip(*args, cache=cache, expect=1)
        assert pq.read_table(out).equals(signal_reference)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def fill(path: Path) -> None:
    """Write zeros to path until the file system refuses."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # Fill the last partial block too.
    with open(path, "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0")
        except OSError:
            pass
