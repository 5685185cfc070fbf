"""`tagclip annotate` in a subprocess on real photos and odd images, with a random-weight checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tagclip_cli.vocab import load_vocabulary


def run_tagclip(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(cache), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "tagclip_cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_annotate_photos_twice_reuses_text_cache(photo_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "labels.parquet"
    cache = tmp_path / "cache"
    first = run_tagclip("annotate", str(photo_dir), "--vocab", "voc", "--out", str(out),
                        "--checkpoint", str(tiny_checkpoint), "--workers", "0", cache=cache)
    assert "0 of 45 classes from cache" in first.stderr
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"tagclip"])
    voc = load_vocabulary("voc")
    assert meta["classes"] == list(voc.classes) and meta["background"] == list(voc.background)
    assert meta["model"]["weights"].startswith("checkpoint:")
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == sorted(p.name for p in photo_dir.iterdir())
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None
        assert len(r["scores"]) == 20 and all(np.isfinite(r["scores"]))
        assert r["tags"] and set(r["tags"]) <= set(voc.classes)
        with Image.open(photo_dir / r["image_id"]) as im:
            assert (r["width"], r["height"]) == im.size
    second = run_tagclip("annotate", str(photo_dir), "--vocab", "voc", "--out", str(out), "--overwrite",
                         "--checkpoint", str(tiny_checkpoint), "--workers", "0", cache=cache)
    assert "45 of 45 classes from cache" in second.stderr
    assert pq.read_table(out).to_pylist() == rows  # deterministic
    # The same command once more, without --overwrite: a no-op that succeeds and leaves the file alone.
    stamp = out.stat().st_mtime_ns
    third = run_tagclip("annotate", str(photo_dir), "--vocab", "voc", "--out", str(out),
                        "--checkpoint", str(tiny_checkpoint), "--workers", "0", cache=cache)
    assert "already complete for these images and this configuration; nothing to do" in " ".join(third.stderr.split())
    assert f"0 done, {len(rows)} skipped (already done), 0 failed" in third.stderr
    assert out.stat().st_mtime_ns == stamp


def test_annotate_odd_sizes_and_modes(tiny_checkpoint, tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (500, 17, 3), dtype=np.uint8)).save(src / "tall_17x500.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).save(src / "one_pixel.png")
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(src / "big_4000x3000.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 60), dtype=np.uint8), mode="L").save(src / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 4), dtype=np.uint8), mode="RGBA").save(src / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert("P").save(src / "palette.png")
    out = tmp_path / "odd.parquet"
    run_tagclip("annotate", str(src), "--vocab", "voc", "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                "--workers", "1", "--batch-size", "3", cache=tmp_path / "cache")
    rows = {r["image_id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {"tall_17x500.png", "one_pixel.png", "big_4000x3000.jpg", "gray.png", "rgba.png",
                         "palette.png"}
    assert (rows["tall_17x500.png"]["width"], rows["tall_17x500.png"]["height"]) == (17, 500)
    assert (rows["big_4000x3000.jpg"]["width"], rows["big_4000x3000.jpg"]["height"]) == (4000, 3000)
    for r in rows.values():
        assert r["status"] == "ok", r
        assert len(r["scores"]) == 20 and r["tags"]


def test_annotate_help_and_missing_weights_message(tmp_path):
    helptext = run_tagclip("annotate", "--help", cache=tmp_path).stdout
    for option in ("--vocab", "--out", "--model", "--pretrained", "--checkpoint", "--device", "--background",
                   "--no-background", "--tag-threshold", "--reference-compat"):
        assert option in helptext
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    missing = run_tagclip("annotate", str(images), "--vocab", "voc", "--out", str(tmp_path / "x.parquet"),
                          "--checkpoint", str(tmp_path / "nope.pt"), cache=tmp_path, check=False)
    assert missing.returncode == 2
    assert "nope.pt" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.parquet").exists()
