"""`tagclip show`: colours, mask blending, COCO mask parsing, overlays, index.html, CLI exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tagclip_cli.errors import UsageError
from tagclip_cli.formats import class_color, label_map, load_masks, read_tags_schema
from tagclip_cli.show import ShowConfig, build_gallery, safe_name
from tagclip_cli.showdraw import MIN_PANEL_WIDTH, blend_masks, fit_size
from tagclip_cli.writers import tags_schema, write_parquet_atomic

# ---- fixtures -------------------------------------------------------------------------------------


def rle(mask: np.ndarray) -> dict:
    """COCO RLE with a str `counts`, as `tagclip segment` writes it."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def write_tags(path: Path, classes: list[str], rows: list[dict]) -> Path:
    schema = tags_schema({"classes": classes, "tool": "tagclip-cli"})
    full = []
    for i, row in enumerate(rows):
        failed = row.get("error") is not None
        full.append({
            "index": i, "image_id": row["image_id"], "path": row.get("path", f"/nowhere/{row['image_id']}"),
            "width": row.get("width"), "height": row.get("height"), "status": "failed" if failed else "ok",
            "error": row.get("error"), "tags": row.get("tags", []), "scores": None if failed else row["scores"],
        })
    write_parquet_atomic([pa.Table.from_pylist(full, schema=schema)], path, schema)
    return path


def write_masks(path: Path, classes: list[str], images: list[dict], annotations: list[dict]) -> Path:
    data = {
        "images": images,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
        "annotations": [
            {"id": k + 1, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0], **ann} for k, ann in enumerate(annotations)
        ],
    }
    path.write_text(json.dumps(data))
    return path


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 image with distinct pixel values."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


CLASSES = ["cat", "dog", "car"]


@pytest.fixture()
def small_run(tmp_path):
    """Four PNG images: two with masks, one failed row, one missing at show time."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    a = gradient(400, 300, 1)
    b = gradient(64, 48, 2)
    Image.fromarray(a).save(images / "a.png")
    Image.fromarray(b).save(images / "sub" / "b.png")
    (images / "broken.png").write_bytes(b"not a png")
    tags = write_tags(tmp_path / "labels.parquet", CLASSES, [
        {"image_id": "a.png", "width": 400, "height": 300, "tags": ["cat", "car"], "scores": [0.9, 0.1, 0.6]},
        {"image_id": "sub/b.png", "width": 64, "height": 48, "tags": [], "scores": [0.2, 0.3, 0.1]},
        {"image_id": "broken.png", "error": "not an image (unrecognised format)"},
        {"image_id": "gone.png", "width": 10, "height": 10, "tags": ["dog"], "scores": [0.0, 0.8, 0.0]},
    ])
    cat = np.zeros((300, 400), bool)
    cat[100:200, 50:150] = True
    car = np.zeros((300, 400), bool)
    car[150:250, 100:300] = True  # overlaps the cat; lower score, so the cat keeps the overlap
    dog_b = np.zeros((48, 64), bool)
    dog_b[0:10, 0:10] = True
    masks = write_masks(
        tmp_path / "masks.json", CLASSES,
        [{"id": 1, "file_name": "a.png", "width": 400, "height": 300},
         {"id": 2, "file_name": "sub/b.png", "width": 64, "height": 48}],
        [{"image_id": 1, "category_id": 1, "segmentation": rle(cat), "score": 0.9},
         {"image_id": 1, "category_id": 3, "segmentation": rle(car), "score": 0.6},
         {"image_id": 2, "category_id": 2, "segmentation": rle(dog_b), "score": 0.5}],
    )
    return {"images": images, "tags": tags, "masks": masks, "a": a, "b": b, "cat": cat, "car": car, "dog_b": dog_b}


def embedded_data(index_html: Path) -> dict:
    text = index_html.read_text(encoding="utf-8")
    found = re.search(r'<script id="gallery-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "index.html has no embedded gallery data"
    return json.loads(found.group(1))


# ---- pure helpers ---------------------------------------------------------------------------------


def test_class_color_is_the_voc_palette():
    # PASCAL VOC: 1 aeroplane (128,0,0), 2 bicycle (0,128,0), 3 bird (128,128,0), 15 person (192,128,128).
    assert class_color(1) == (128, 0, 0)
    assert class_color(2) == (0, 128, 0)
    assert class_color(3) == (128, 128, 0)
    assert class_color(15) == (192, 128, 128)
    assert class_color(256) == class_color(1)  # wraps past 255, never black
    assert len({class_color(i) for i in range(1, 256)}) == 255
    with pytest.raises(ValueError):
        class_color(0)


def test_blend_masks_interior_edge_and_outside():
    image = np.full((5, 5, 3), (100, 50, 200), dtype=np.uint8)
    labels = np.zeros((5, 5), dtype=np.int32)
    labels[1:4, 1:4] = 1
    colors = np.array([(0, 0, 0), (128, 0, 0)], dtype=np.uint8)
    out = blend_masks(image, labels, colors, alpha=0.5)
    # centre: 0.5 * (100, 50, 200) + 0.5 * (128, 0, 0) = (114, 25, 100)
    assert out[2, 2].tolist() == [114, 25, 100]
    # the mask's boundary ring is the pure class colour
    ring = labels.astype(bool).copy()
    ring[2, 2] = False
    assert (out[ring] == (128, 0, 0)).all()
    # outside: untouched
    assert (out[labels == 0] == (100, 50, 200)).all()


def test_blend_masks_boundary_between_two_classes():
    image = np.zeros((1, 4, 3), dtype=np.uint8)
    labels = np.array([[1, 1, 2, 2]])
    colors = np.array([(0, 0, 0), (200, 0, 0), (0, 200, 0)], dtype=np.uint8)
    out = blend_masks(image, labels, colors, alpha=0.5)
    # a 1-pixel-high strip is all boundary (top and bottom are outside the image, not other labels):
    # only pixels next to a different label count, i.e. columns 1 and 2.
    assert out[0, 0].tolist() == [100, 0, 0]
    assert out[0, 1].tolist() == [200, 0, 0]
    assert out[0, 2].tolist() == [0, 200, 0]
    assert out[0, 3].tolist() == [0, 100, 0]


def test_fit_size_only_shrinks():
    assert fit_size(800, 600, 400) == (400, 300)
    assert fit_size(300, 1000, 500) == (150, 500)
    assert fit_size(64, 48, 400) == (64, 48)


def test_safe_name_is_unique_by_index_and_file_system_safe():
    assert safe_name(3, "sub dir/a&b <x>.jpg") == "0000003_a_b_x"
    assert safe_name(4, "../..") == "0000004_image"
    assert safe_name(1, "a.jpg") != safe_name(2, "b/a.jpg")


def test_label_map_higher_score_wins_whatever_the_order():
    left = np.zeros((4, 6), bool)
    left[:, :4] = True
    right = np.zeros((4, 6), bool)
    right[:, 2:] = True
    anns = [
        {"category_id": 7, "segmentation": rle(left), "score": 0.9},
        {"category_id": 8, "segmentation": rle(right), "score": 0.4},
    ]
    expected = np.array([[1, 1, 1, 1, 2, 2]] * 4)
    assert (label_map(anns, {7: 1, 8: 2}, 4, 6) == expected).all()
    assert (label_map(anns[::-1], {7: 1, 8: 2}, 4, 6) == expected).all()


def test_label_map_accepts_bytes_counts_and_polygons():
    square = np.zeros((10, 10), bool)
    square[2:6, 2:6] = True
    as_bytes = dict(rle(square))
    as_bytes["counts"] = as_bytes["counts"].encode("ascii")
    out = label_map([{"category_id": 1, "segmentation": as_bytes}], {1: 3}, 10, 10)
    assert (out == np.where(square, 3, 0)).all()
    polygon = [[0.0, 0.0, 5.0, 0.0, 5.0, 5.0, 0.0, 5.0]]
    out = label_map([{"category_id": 1, "segmentation": polygon}], {1: 1}, 10, 10)
    assert out[1, 1] == 1 and out[8, 8] == 0


def test_label_map_resizes_masks_of_another_size():
    half = np.zeros((2, 2), bool)
    half[:, 1] = True
    out = label_map([{"category_id": 1, "segmentation": rle(half)}], {1: 1}, 4, 4, resize=True)
    assert (out == np.array([[0, 0, 1, 1]] * 4)).all()


# ---- inputs ---------------------------------------------------------------------------------------


def test_load_masks_matches_by_tagclip_id_file_name_and_unique_basename(tmp_path):
    path = write_masks(tmp_path / "m.json", ["cat"], [
        {"id": 10, "file_name": "x/one.jpg", "tagclip_image_id": "x/one.jpg", "width": 2, "height": 2},
        {"id": 11, "file_name": "two.jpg", "width": 2, "height": 2},
        {"id": 12, "file_name": "p/dup.jpg", "width": 2, "height": 2},
        {"id": 13, "file_name": "q/dup.jpg", "width": 2, "height": 2},
    ], [])
    index = load_masks(path)
    assert index.lookup("x/one.jpg", None) == 10
    assert index.lookup("two.jpg", None) == 11
    assert index.lookup("elsewhere/two.jpg", None) == 11  # unique basename
    assert index.lookup("r/dup.jpg", None) is None  # ambiguous basename: no guess
    assert index.lookup("q/dup.jpg", None) == 13
    assert index.lookup("missing.jpg", "/abs/two.jpg") is None


def read_tag_classes(path: Path) -> list[str]:
    """The classes `tagclip show` reads from a tags file's metadata."""
    return read_tags_schema(path).classes or []


def test_read_tag_classes_and_bad_tag_files(tmp_path):
    tags = write_tags(tmp_path / "t.parquet", CLASSES, [{"image_id": "a", "tags": [], "scores": [0, 0, 0]}])
    assert read_tag_classes(tags) == CLASSES
    with pytest.raises(UsageError, match="no such tags file"):
        read_tag_classes(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(UsageError, match="not a Parquet file"):
        read_tag_classes(tmp_path / "text.parquet")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(UsageError, match="missing columns: index, path"):
        read_tag_classes(tmp_path / "other.parquet")


# ---- the gallery ----------------------------------------------------------------------------------


def test_overlays_keep_the_image_and_add_a_legend_below(small_run, tmp_path):
    out = tmp_path / "gallery"
    summary = build_gallery(ShowConfig(images=small_run["images"], tags=small_run["tags"], out=out,
                                       masks=small_run["masks"], max_side=1600))
    assert summary.images == 4 and summary.failed_rows == 1
    assert summary.unreadable == [("gone.png", "image file not found")]
    assert summary.unmatched_masks == 0

    overlay_a = np.asarray(Image.open(out / "overlays" / "0000000_a.png").convert("RGB"))
    a, cat, car = small_run["a"], small_run["cat"], small_run["car"]
    assert overlay_a.shape[1] == 400 and overlay_a.shape[0] > 300  # image part 400x300 + legend
    part = overlay_a[:300]
    untouched = ~(cat | car)
    assert (part[untouched] == a[untouched]).all()
    # inside the cat, away from its boundary: half image, half VOC colour 1 (128, 0, 0)
    expected = np.rint(0.5 * a[150, 100].astype(float) + 0.5 * np.array([128, 0, 0])).astype(np.uint8)
    assert part[150, 100].tolist() == expected.tolist()
    # where cat (0.9) and car (0.6) overlap the cat wins; car-only pixels get VOC colour 3 (128, 128, 0)
    assert part[180, 120].tolist() == expected_blend(a[180, 120], (128, 0, 0))
    assert part[230, 250].tolist() == expected_blend(a[230, 250], (128, 128, 0))
    # legend panel: white background with dark text somewhere
    legend = overlay_a[300:]
    assert (legend == 255).all(axis=2).mean() > 0.5 and (legend < 100).all(axis=2).any()

    # a 64x48 image sits at the top left of a canvas as wide as the legend needs
    overlay_b = np.asarray(Image.open(out / "overlays" / "0000001_b.png").convert("RGB"))
    assert overlay_b.shape[1] == MIN_PANEL_WIDTH
    dog = small_run["dog_b"]
    assert (overlay_b[:48, :64][~dog] == small_run["b"][~dog]).all()
    assert (overlay_b[:48, 64:] == 255).all()

    # failed and missing images: a red frame around a placeholder
    for name in ("0000002_broken.png", "0000003_gone.png"):
        failed = np.asarray(Image.open(out / "overlays" / name).convert("RGB"))
        assert failed[0, 0].tolist() == [220, 30, 30]
        assert failed[239, 100].tolist() == [220, 30, 30]  # bottom edge of the 320x240 placeholder

    thumb = Image.open(out / "thumbs" / "0000000_a.jpg")
    assert thumb.size == (256, 192)


def expected_blend(pixel: np.ndarray, color: tuple[int, int, int]) -> list[int]:
    return np.rint(0.5 * pixel.astype(float) + 0.5 * np.array(color)).astype(np.uint8).tolist()


def test_index_html_data_cards_tags_masks_and_failures(small_run, tmp_path):
    out = tmp_path / "gallery"
    build_gallery(ShowConfig(images=small_run["images"], tags=small_run["tags"], out=out,
                             masks=small_run["masks"], page_size=2))
    data = embedded_data(out / "index.html")
    assert data["pageSize"] == 2
    assert [c["name"] for c in data["classes"]] == CLASSES
    assert data["classes"][0]["color"] == "#800000"
    cards = {c["id"]: c for c in data["cards"]}
    assert list(cards) == ["a.png", "sub/b.png", "broken.png", "gone.png"]
    assert cards["a.png"]["tags"] == [[0, 0.9], [2, 0.6]]
    assert cards["a.png"]["masks"] == [0, 2]
    assert cards["a.png"]["err"] is None and cards["a.png"]["size"] == "400x300"
    assert cards["sub/b.png"]["tags"] == [] and cards["sub/b.png"]["masks"] == [1]  # mask, no tag
    assert cards["broken.png"]["err"] == "not an image (unrecognised format)"
    assert cards["gone.png"]["err"] == "cannot read image now: image file not found"
    for card in cards.values():
        assert (out / card["o"]).is_file() and (out / card["t"]).is_file()
        assert Image.open(out / card["t"]).size == (card["tw"], card["th"])
    text = (out / "index.html").read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert "<script src" not in text and "<img" not in text  # scripts inline, images made by JS


def test_hostile_image_ids_cannot_break_out_of_the_page(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    name = "</script><script>alert(1)</script>.png"
    tags = write_tags(tmp_path / "t.parquet", ["a"], [{"image_id": name, "tags": ["a"], "scores": [0.5]}])
    out = tmp_path / "g"
    build_gallery(ShowConfig(images=images, tags=tags, out=out))
    text = (out / "index.html").read_text()
    assert text.count("</script>") == 2  # the data block and the code block, nothing injected
    assert embedded_data(out / "index.html")["cards"][0]["id"] == name


def test_limit_and_downscaling(small_run, tmp_path):
    out = tmp_path / "gallery"
    summary = build_gallery(ShowConfig(images=small_run["images"], tags=small_run["tags"], out=out,
                                       max_side=200, limit=1))
    assert summary.images == 1
    assert len(embedded_data(out / "index.html")["cards"]) == 1
    overlay = Image.open(out / "overlays" / "0000000_a.png")
    assert overlay.width == MIN_PANEL_WIDTH  # the 200x150 image part is narrower than the legend
    assert np.asarray(overlay.convert("RGB"))[:150, 200:].min() == 255


def test_bad_inputs_raise_usage_errors(small_run, tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        build_gallery(ShowConfig(images=tmp_path / "nope", tags=small_run["tags"], out=tmp_path / "g"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        build_gallery(ShowConfig(images=small_run["images"], tags=small_run["tags"], out=tmp_path / "file"))


# ---- CLI ------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagclip_cli", "show", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_exit_codes_and_one_line_errors(small_run, tmp_path):
    out = tmp_path / "gallery"
    # one image is missing at show time: everything is drawn, exit code 1
    done = run_cli("--images", str(small_run["images"]), "--tags", str(small_run["tags"]),
                   "--masks", str(small_run["masks"]), "--out", str(out), "--workers", "2")
    assert done.returncode == 1, done.stderr
    assert "4 images (1 failed in the tags file, 1 unreadable now)" in done.stderr
    assert "gone.png" in done.stderr
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert (out / "index.html").stat().st_mode & 0o777 == 0o644

    bad = run_cli("--images", str(small_run["images"]), "--tags", str(tmp_path / "missing.parquet"),
                  "--out", str(out))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and "no such tags file" in bad.stderr


def test_images_folder_is_honoured_and_optional(tmp_path):
    """--images DIR draws DIR/<image id> only (an empty folder draws nothing: every image is
    unreadable, exit 1); without --images the paths recorded in the tags file are drawn."""
    recorded, other, empty = tmp_path / "recorded", tmp_path / "other", tmp_path / "empty"
    for folder in (recorded, other, empty):
        folder.mkdir()
    names = [f"img{i}.png" for i in range(3)]
    for name in names:
        Image.fromarray(np.full((40, 60, 3), (0, 0, 255), np.uint8)).save(recorded / name)  # blue
        Image.fromarray(np.full((40, 60, 3), (0, 255, 0), np.uint8)).save(other / name)  # green
    tags = write_tags(tmp_path / "tags.parquet", ["a"], [
        {"image_id": name, "path": str(recorded / name), "width": 60, "height": 40, "tags": [], "scores": [0.1]}
        for name in names])

    def first_pixel(out: Path) -> tuple:
        return Image.open(next((out / "overlays").glob("*.png"))).convert("RGB").getpixel((5, 5))

    done = run_cli("--tags", str(tags), "--out", str(tmp_path / "g-recorded"), "--workers", "0")
    assert done.returncode == 0 and "3 images (0 failed in the tags file, 0 unreadable now)" in done.stderr
    assert first_pixel(tmp_path / "g-recorded") == (0, 0, 255)
    done = run_cli("--images", str(other), "--tags", str(tags), "--out", str(tmp_path / "g-other"), "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert first_pixel(tmp_path / "g-other") == (0, 255, 0)
    done = run_cli("--images", str(empty), "--tags", str(tags), "--out", str(tmp_path / "g-empty"), "--workers", "0")
    assert done.returncode == 1
    assert "3 images (0 failed in the tags file, 3 unreadable now)" in done.stderr
    summary = build_gallery(ShowConfig(tags=tags, out=tmp_path / "g-api", images=empty))
    assert [image_id for image_id, _ in summary.unreadable] == names
