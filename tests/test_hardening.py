"""Hardening: every bad image becomes a specific reason, odd-but-valid images decode correctly, and
faults (out of memory, disk full, signals) leave a resumable state. In-process; the CLI side is in
tests/e2e/test_bad_inputs_e2e.py."""

from __future__ import annotations

import errno
import io
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
from tagclip_cli.data import DecodeError, ImageDataset, ImageItem, Preprocess, list_folder, load_rgb
from tagclip_cli.writers import output_text, tag_row, tags_schema

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
    got = {r["item"].image_id: r for r in records}
    for image_id, outcome in expect.items():
        rec = got[image_id]
        if outcome.status == "ok":
            assert rec["error"] is None, (image_id, rec["error"])
            assert (rec["width"], rec["height"]) == outcome.size, image_id
            w, h = outcome.size
            assert tuple(rec["pixels"].shape) == (3, max(16, -(-h // 16) * 16), max(16, -(-w // 16) * 16))
            assert torch.isfinite(rec["pixels"]).all()
        else:
            assert rec["pixels"] is None and rec["width"] is None, image_id
            assert outcome.reason in rec["error"], (image_id, rec["error"])
    # All failure reasons are distinct per kind of problem (no catch-all message).
    reasons = {image_id: got[image_id]["error"] for image_id, o in expect.items() if o.status == "failed"}
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
        rows.append(tag_row(rec["item"], rec["width"], rec["height"], rec["error"], [], [0.0] * 2))
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
    assert rec["error"] is None and (rec["width"], rec["height"]) == (1, 1)
    assert tuple(rec["pixels"].shape) == (3, 16, 16)
    np.testing.assert_array_equal(to_uint8(rec["pixels"]).reshape(-1, 3), np.tile([255, 0, 0], (256, 1)))


def test_max_side_downscales_and_keeps_the_original_size(tmp_path: Path):
    path = tmp_path / "wide.png"
    Image.fromarray(noise(50, 100)).save(path)
    ds = ImageDataset([ImageItem(0, "wide.png", str(path))], preprocess(max_side=32))
    rec = ds[0]
    # 100x50 capped to 32x16, already multiples of 16.
    assert (rec["width"], rec["height"], rec["downscaled"]) == (100, 50, True)
    assert tuple(rec["pixels"].shape) == (3, 16, 32)
    assert ImageDataset(ds.items, preprocess(max_side=100))[0]["downscaled"] is False


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode; see the injected variant")
def test_permission_denied_on_a_real_unreadable_file(tmp_path: Path):
    path = tmp_path / "locked.jpg"
    Image.fromarray(noise(8, 8)).save(path)
    path.chmod(0)
    try:
        with pytest.raises(DecodeError, match=r"^permission denied$"):
            load_rgb(str(path))
    finally:
        path.chmod(0o644)


def test_a_decoder_crash_becomes_a_failed_record(tmp_path: Path, monkeypatch):
    path = tmp_path / "x.png"
    Image.fromarray(noise(8, 8)).save(path)

    def crash(*args, **kwargs):
        raise ZeroDivisionError("bug in a plugin")

    monkeypatch.setattr(data, "to_rgb", crash)
    rec = ImageDataset([ImageItem(0, "x.png", str(path))], preprocess())[0]
    assert rec["error"] == "cannot decode image (ZeroDivisionError: bug in a plugin)"
    assert rec["pixels"] is None


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
