"""Hardening: every bad image becomes a specific reason, odd-but-valid images decode correctly, and
faults (out of memory, disk full, signals) leave a resumable state. In-process; the CLI side is in
tests/e2e/test_bad_inputs_e2e.py."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from bad_images import NON_UTF8_ID, NON_UTF8_NAME, exif_rotated_jpeg, gradient, make_bad_corpus, noise
from PIL import Image, ImageFile

from tagclip_cli import data
from tagclip_cli.data import DecodedImage, DecodeError, ImageDataset, Preprocess, load_rgb
from tagclip_cli.fileio import output_text
from tagclip_cli.sources import ImageItem, list_folder
from tagclip_cli.writers import tag_row, tags_schema

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def preprocess(max_side: int | None = None, max_pixels: int = data.DEFAULT_MAX_PIXELS) -> Preprocess:
    return Preprocess(16, MEAN, STD, max_side, max_pixels)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, H, W) -> (H, W, 3) uint8."""
    arr = pixels.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
    return np.round(arr * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from bad_images import restore_permissions

    root = tmp_path_factory.mktemp("bad") / "corpus"
    expect = make_bad_corpus(root)
    yield root, expect
    restore_permissions(root)


# ---- the corpus ----------------------------------------------------------------------------------


def test_list_folder_reports_every_file_including_broken_links_pipes_and_bad_names(corpus):
    root, expect = corpus
    items = list_folder(root)
    assert [it.image_id for it in items] == sorted(expect)
    by_id = {it.image_id: it for it in items}
    # The escaped id is printable; the path still opens the real file.
    assert os.fsencode(by_id[NON_UTF8_ID].path).endswith(NON_UTF8_NAME)
    assert load_rgb(by_id[NON_UTF8_ID].path).size == (3, 2)


def test_every_corpus_file_gets_its_outcome(corpus):
    root, expect = corpus
    items = list_folder(root)
    records = [ImageDataset(items, preprocess())[i] for i in range(len(items))]
    got = {r.item.image_id: r for r in records}
    for image_id, outcome in expect.items():
        rec = got[image_id]
        if outcome.status == "ok":
            assert rec.error is None, (image_id, rec.error)
            assert (rec.width, rec.height) == outcome.size, image_id
            w, h = outcome.size
            assert tuple(rec.pixels.shape) == (3, max(16, -(-h // 16) * 16), max(16, -(-w // 16) * 16))
            assert torch.isfinite(rec.pixels).all()
        else:
            assert rec.pixels is None and rec.width is None, image_id
            assert outcome.reason in rec.error, (image_id, rec.error)
    # All failure reasons are distinct per kind of problem (no catch-all message).
    reasons = {image_id: got[image_id].error for image_id, o in expect.items() if o.status == "failed"}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["broken_link.jpg"] == "broken symbolic link (its target does not exist)"
    assert reasons["pipe.png"] == "not a regular file (a named pipe)"
    assert reasons["notes.png"] == "not an image (the file is text)"
    assert reasons["page.jpg"] == "not an image (the file is HTML/XML text)"
    assert reasons["bomb.png"] == "image too large (900 megapixels, limit 179); decompression-bomb guard"
    assert reasons["truncated.jpg"].startswith("truncated image (JPEG: ")
    assert reasons["truncated.png"].startswith("truncated image (PNG: ")


def test_failed_and_escaped_rows_fit_the_parquet_schema(corpus):
    root, expect = corpus
    items = list_folder(root)
    ds = ImageDataset(items, preprocess())
    rows = []
    for i in range(len(items)):
        rec = ds[i]
        rows.append(tag_row(rec.item, rec.width, rec.height, rec.error, [], [0.0] * 2))
    table = pa.Table.from_pylist(rows, schema=tags_schema({"classes": ["a", "b"]}))
    ids = table.column("image_id").to_pylist()
    assert NON_UTF8_ID in ids
    path = table.column("path").to_pylist()[ids.index(NON_UTF8_ID)]
    assert path.endswith("caf\\xe9.png")
    statuses = dict(zip(ids, table.column("status").to_pylist(), strict=True))
    assert statuses == {image_id: o.status for image_id, o in expect.items()}


def test_output_text_escapes_only_undecodable_bytes():
    assert output_text("plain/é/猫.png") == "plain/é/猫.png"
    assert output_text(os.fsdecode(b"a/caf\xe9.png")) == "a/caf\\xe9.png"
    assert output_text("lone \ud800 surrogate") == "lone \\ud800 surrogate"
    # The escaped form is valid UTF-8 (Parquet accepts it).
    pa.array([output_text(os.fsdecode(b"\xff\xfe"))])


# ---- unusual but valid images: the pixels are right ---------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path):
    path = tmp_path / "rot.jpg"
    path.write_bytes(exif_rotated_jpeg(40, 20, orientation=6))
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))
    assert stored.shape == (20, 40, 3)
    img = load_rgb(str(path))
    assert img.size == (20, 40)
    # Orientation 6: the stored image is shown rotated 90 degrees clockwise.
    np.testing.assert_array_equal(np.asarray(img), np.rot90(stored, k=-1))


def test_animated_gif_and_webp_use_the_first_frame(corpus):
    root, _ = corpus
    for name in ("animated.gif", "animated.webp"):
        arr = np.asarray(load_rgb(str(root / name)))
        assert arr.shape == (16, 24, 3)
        np.testing.assert_allclose(arr.reshape(-1, 3).mean(0), [255, 0, 0], atol=2)


def test_sixteen_bit_grey_is_scaled_not_clipped(corpus):
    root, _ = corpus
    arr = np.asarray(load_rgb(str(root / "gray16.png")))
    stored = np.arange(30 * 20, dtype=np.float64).reshape(20, 30) * 100  # up to 59900 of 65535
    expected = (stored / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(arr[..., 0], expected)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    assert arr.max() == 233  # 59900 / 65535 * 255, truncated: the full range is used, not clipped at 255


def test_palette_transparency_is_composited_on_white(tmp_path: Path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    path = tmp_path / "p.png"
    pal.save(path, transparency=0)
    arr = np.asarray(load_rgb(str(path)))
    np.testing.assert_array_equal(arr[0, 0], [255, 255, 255])  # index 0 is transparent -> white
    np.testing.assert_array_equal(arr[0, 1], [200, 10, 10])


def test_cmyk_jpeg_colours_are_not_inverted(corpus):
    root, _ = corpus
    arr = np.asarray(load_rgb(str(root / "cmyk.jpg"))).astype(int)
    diff = np.abs(arr - gradient(20, 28).astype(int)).mean()
    assert diff < 12, diff  # an inverted or channel-swapped decode is off by ~100


def test_image_smaller_than_a_patch_is_resized_to_one_patch(tmp_path: Path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    rec = ImageDataset([ImageItem(0, "one.png", str(path))], preprocess())[0]
    assert rec.error is None and (rec.width, rec.height) == (1, 1)
    assert tuple(rec.pixels.shape) == (3, 16, 16)
    np.testing.assert_array_equal(to_uint8(rec.pixels).reshape(-1, 3), np.tile([255, 0, 0], (256, 1)))


def test_max_side_downscales_and_keeps_the_original_size(tmp_path: Path):
    path = tmp_path / "wide.png"
    Image.fromarray(noise(50, 100)).save(path)
    ds = ImageDataset([ImageItem(0, "wide.png", str(path))], preprocess(max_side=32))
    rec = ds[0]
    # 100x50 capped to 32x16, already multiples of 16.
    assert (rec.width, rec.height, rec.downscaled) == (100, 50, True)
    assert tuple(rec.pixels.shape) == (3, 16, 32)
    assert ImageDataset(ds.items, preprocess(max_side=100))[0].downscaled is False


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(noise(40, 50)).save(path)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(DecodeError, match=r"^image too large \(50x40 = 0 megapixels, limit 0\); decompression-bomb"):
        load_rgb(str(path), max_pixels=1999)
    assert decoded == []


def test_truncated_images_fail_even_if_someone_enabled_load_truncated(tmp_path: Path, monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, format="JPEG")
    path = tmp_path / "t.jpg"
    path.write_bytes(buf.getvalue()[:-200])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DecodeError, match=r"^truncated image \(JPEG: image file is truncated"):
        load_rgb(str(path))


def test_permission_denied_is_its_own_reason(tmp_path: Path, monkeypatch):
    path = tmp_path / "locked.jpg"
    Image.fromarray(noise(8, 8)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    # Root reads files whatever their mode bits say, so the refusal is injected.
    monkeypatch.setattr(data, "open", refuse, raising=False)
    with pytest.raises(DecodeError, match=r"^permission denied$"):
        load_rgb(str(path))


def test_permission_denied_on_a_real_unreadable_file(tmp_path: Path):
    """A real mode-000 file. Root reads any file, so as root the reader runs without the
    capabilities that bypass file modes (util-linux setpriv)."""
    import subprocess
    import sys

    path = tmp_path / "locked.jpg"
    Image.fromarray(noise(8, 8)).save(path)
    path.chmod(0)
    code = (
        "import sys\n"
        "from tagclip_cli.data import DecodeError, load_rgb\n"
        "try:\n    load_rgb(sys.argv[1])\nexcept DecodeError as exc:\n    print(exc)\n"
    )
    command = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        path.chmod(0o644)
    assert proc.stdout.strip() == "permission denied", proc.stderr


def test_a_decoder_crash_becomes_a_failed_record(tmp_path: Path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(noise(8, 8)).save(path)

    def crash(*args, **kwargs):
        raise ZeroDivisionError("bug in a plugin")

    monkeypatch.setattr(data, "to_rgb", crash)
    rec = ImageDataset([ImageItem(0, "x.png", str(path))], preprocess())[0]
    assert rec.error == "cannot decode image (ZeroDivisionError: bug in a plugin)"
    assert rec.pixels is None


def test_directory_named_like_an_image_is_descended_not_reported(tmp_path: Path):
    (tmp_path / "album.jpg").mkdir()
    Image.fromarray(noise(8, 8)).save(tmp_path / "album.jpg" / "inside.png")
    assert [it.image_id for it in list_folder(tmp_path)] == ["album.jpg/inside.png"]
    with pytest.raises(DecodeError, match=r"^not a regular file \(a directory\)$"):
        load_rgb(str(tmp_path / "album.jpg"))


def test_worker_signal_handlers_ignore_sigint_and_sigterm():
    from tagclip_cli.faults import ignore_signals_in_worker

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        ignore_signals_in_worker(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# ---- out of memory ---------------------------------------------------------------------------------


def fake_records(n: int, shape: tuple[int, ...] = (1,)) -> list[DecodedImage]:
    return [DecodedImage(ImageItem(i, f"{i}.png", f"/x/{i}.png"), torch.zeros(shape), 1, 1) for i in range(n)]


class FakeModel:
    """process(records): OOM when a batch has more than `fits` images or contains an image in `never`."""

    def __init__(self, fits: int, never: tuple[int, ...] = ()) -> None:
        self.fits, self.never, self.sizes = fits, never, []

    def __call__(self, records: list[DecodedImage]) -> list[dict]:
        good = [r for r in records if r.error is None]
        if good:
            self.sizes.append(len(good))
        if len(good) > self.fits or any(r.item.index in self.never for r in good):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [{"index": r.item.index, "status": "failed" if r.error else "ok", "error": r.error} for r in records]


def test_oom_halves_the_batch_and_remembers_the_size_that_fits():
    from tagclip_cli.faults import OomSplitter

    model = FakeModel(fits=2)
    split = OomSplitter(model)
    rows = split(fake_records(8))
    assert [r["index"] for r in rows] == list(range(8)) and all(r["status"] == "ok" for r in rows)
    assert model.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert split.limits == {(1,): 2}
    model.sizes.clear()
    assert len(split(fake_records(7))) == 7
    assert model.sizes == [2, 2, 2, 1]  # later batches go straight to the size that worked


def test_an_image_that_does_not_fit_alone_is_failed_and_the_rest_done():
    from tagclip_cli.faults import OomSplitter

    model = FakeModel(fits=8, never=(5,))
    split = OomSplitter(model)
    rows = split(fake_records(8))
    assert [r["index"] for r in rows] == list(range(8))
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"] + ["ok"] * 2
    assert rows[5]["error"] == "out of memory"
    assert split.failed == 1
    assert model.sizes == [8, 4, 4, 2, 1, 1, 2]  # 0-3 ok; 4-7 -> (4,5 -> 4 ok, 5 fails alone), 6-7 ok
    assert split.limits == {}  # one image that never fits does not shrink everyone's batches
    model.sizes.clear()
    split(fake_records(4))
    assert model.sizes == [4]


def test_limits_are_per_input_shape_and_a_poisoned_image_does_not_hide_a_real_limit():
    from tagclip_cli.faults import OomSplitter

    model = FakeModel(fits=2, never=(5,))
    split = OomSplitter(model)
    rows = split(fake_records(8))
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"] + ["ok"] * 2
    assert split.limits == {(1,): 2}  # learnt from the clean half 0-3
    other = fake_records(4, shape=(3, 16, 16))
    model.sizes.clear()
    model.fits = 4
    split(other)
    assert model.sizes == [4]  # another shape starts unlimited


def test_non_oom_errors_are_not_retried():
    from tagclip_cli.faults import OomSplitter, is_out_of_memory

    def broken(records):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        OomSplitter(broken)(fake_records(4))
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 10 bytes"
        )
    )
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())


# ---- signals ---------------------------------------------------------------------------------------


def test_deferred_signals_delivers_after_the_block():
    from tagclip_cli.faults import Interrupted, deferred_signals, install_signal_handlers

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        install_signal_handlers()
        finished = []
        with pytest.raises(Interrupted) as info:
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                finished.append("write completed")  # not interrupted: the signal is held
        assert finished == ["write completed"]
        assert info.value.exit_code == 143 and str(info.value) == "SIGTERM"
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary of the main thread
                pass
        assert info.value.exit_code == 130
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# ---- disk full and a whole run in-process ------------------------------------------------------------


def small_vocab():
    from tagclip_cli.vocab import parse_vocabulary

    return parse_vocabulary("cat\ndog\nbird\n[background]\nsky\n", "tiny-vocab.txt")


@pytest.fixture(scope="module")
def run_images(tmp_path_factory) -> Path:
    """10 small noise images and two broken files (indices 3 and 9 in sorted order)."""
    root = tmp_path_factory.mktemp("run") / "images"
    root.mkdir()
    for i in range(10):
        Image.fromarray(noise(24 + (i % 3) * 8, 32, seed=100 + i)).save(root / f"img{i:02d}.png")
    (root / "img02b.png").write_bytes(b"")
    (root / "img07b.jpg").write_bytes(b"<html>gone</html>")
    return root


@pytest.fixture(scope="module")
def clean_rows(run_images, tiny_checkpoint, cache_dir, tmp_path_factory) -> list[dict]:
    """The rows of an uninterrupted run (the reference for the fault runs)."""
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("clean") / "clean.parquet"
    summary = annotate_in_process(run_images, out, tiny_checkpoint, cache_dir)
    assert (summary.done, summary.failed) == (10, 2)
    return pq.read_table(out).to_pylist()


def annotate_in_process(images: Path, out: Path, checkpoint: Path, cache: Path, **kw):
    from tagclip_cli.pipeline import AnnotateOptions, ModelOptions, run_annotate
    from tagclip_cli.tagclip import TagCLIPConfig

    # No CWR: its per-class masked forwards are most of the time and have nothing to do with faults.
    opts = AnnotateOptions(
        items=list_folder(images),
        vocab=small_vocab(),
        out=out,
        model=ModelOptions(checkpoint=checkpoint, cache_dir=cache),
        tagclip=TagCLIPConfig(use_cwr=False),
        batch_size=2,
        workers=0,
        part_size=1,
        **kw,
    )
    return run_annotate(opts)


def test_disk_full_keeps_earlier_parts_and_resumes_to_the_clean_result(
    run_images, clean_rows, tiny_checkpoint, cache_dir, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from tagclip_cli.errors import OutputWriteError
    from tagclip_cli.jobs import parts as jobs

    expected = clean_rows

    out = tmp_path / "full.parquet"
    real_write = pq.write_table
    calls = []

    def fill_disk(table, where, **kw):
        calls.append(where)
        if len(calls) == 3:  # items.parquet, part 1, then the disk is full half-way through part 2
            real_write(table, where, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(jobs.pq, "write_table", fill_disk)
    with pytest.raises(OutputWriteError) as info:
        annotate_in_process(run_images, out, tiny_checkpoint, cache_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"cannot write {out}.parts/part-000000000008-000000000011.parquet "
        "(no space left on device); the 1 parts written before are intact in "
    )
    assert message.endswith("free some space and rerun the same command to resume")
    assert info.value.exit_code == 2
    work = Path(f"{out}.parts")
    assert sorted(p.name for p in work.iterdir()) == [
        "config.json",
        "items.parquet",
        "job.json",
        "manifest",
        "part-000000000000-000000000007.parquet",
    ]  # no temp file
    lines = b"".join(p.read_bytes() for p in (work / "manifest").iterdir()).splitlines()
    assert [json.loads(line)["part"] for line in lines] == ["part-000000000000-000000000007.parquet"]
    assert pq.read_table(work / "part-000000000000-000000000007.parquet").to_pylist() == expected[:8]
    assert not out.exists()

    monkeypatch.setattr(jobs.pq, "write_table", real_write)
    summary = annotate_in_process(run_images, out, tiny_checkpoint, cache_dir)
    assert (summary.skipped, summary.done, summary.failed, summary.failed_before) == (8, 3, 1, 1)
    assert pq.read_table(out).to_pylist() == expected
    assert not work.exists()


def test_oom_in_the_model_halves_batches_in_a_real_run(
    run_images, clean_rows, tiny_checkpoint, cache_dir, tmp_path, monkeypatch, caplog
):
    import pyarrow.parquet as pq

    from tagclip_cli.tagclip import Tagger

    expected = clean_rows

    real_tag = Tagger.tag
    sizes = []

    def small_gpu(self, pixels):
        sizes.append(len(pixels))
        if len(pixels) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_tag(self, pixels)

    monkeypatch.setattr(Tagger, "tag", small_gpu)
    out = tmp_path / "oom.parquet"
    summary = annotate_in_process(run_images, out, tiny_checkpoint, cache_dir)
    assert (summary.done, summary.failed) == (10, 2)
    got = pq.read_table(out).to_pylist()
    assert [r["image_id"] for r in got] == [r["image_id"] for r in expected]
    assert [r["status"] for r in got] == [r["status"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["tags"] == b["tags"]
        if a["scores"] is not None:
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
    assert max(sizes) == 2 and sizes.count(2) < 10  # after the first OOM of each size, batches of 1
    assert any("retrying in halves" in r.getMessage() for r in caplog.records)


# ---- the text cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_structure"])
def test_a_corrupt_text_cache_is_rebuilt(tiny_backbone, tmp_path, caplog, damage):
    import dataclasses
    import logging

    backbone = dataclasses.replace(tiny_backbone, cache_dir=tmp_path)
    templates = ("a photo of a {}.", "a {}.")
    fresh = backbone.text_classifier(["cat", "dog"], templates)  # (2, D), encodes and writes the cache
    (cache_file,) = (tmp_path / "text").glob("*.pt")
    good = cache_file.read_bytes()
    damaged = {
        "garbage": b"\x00\xffnot a torch file" * 10,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "wrong_structure": None,
    }[damage]
    if damaged is None:
        torch.save({"unexpected": 1}, cache_file)
    else:
        cache_file.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        again = backbone.text_classifier(["cat", "dog"], templates)
    torch.testing.assert_close(again, fresh)
    assert any("unreadable" in r.getMessage() and "re-encoding" in r.getMessage() for r in caplog.records)
    # ...and the rebuilt file is whole again: the next call reads it without re-encoding.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tagclip_cli"):
        torch.testing.assert_close(backbone.text_classifier(["cat", "dog"], templates), fresh)
    assert any("2 of 2 classes from cache" in r.getMessage() for r in caplog.records)


def test_symlinked_directories_are_not_followed_but_reported(tmp_path: Path, caplog):
    import logging

    (tmp_path / "real").mkdir()
    Image.fromarray(noise(8, 8)).save(tmp_path / "real" / "a.png")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    with caplog.at_level(logging.WARNING, logger="tagclip_cli"):
        items = list_folder(tmp_path)
    assert [it.image_id for it in items] == ["real/a.png"]  # not twice
    assert [r.getMessage() for r in caplog.records] == [
        f"1 symbolic link(s) to directories not followed (e.g. {tmp_path / 'alias'}); list such images in a "
        "text file of paths to include them"
    ]
