"""The synthetic shapes generator: determinism, ground truth consistency, folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagclip_cli.synthetic import (
    OBJECT_CLASSES,
    STUFF_CLASSES,
    generate_scene,
    read_folder_dataset,
    write_folder_dataset,
)
from tagclip_cli.vocab import load_vocabulary


def test_same_seed_and_index_give_the_same_scene() -> None:
    a, b = generate_scene(5, seed=3), generate_scene(5, seed=3)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label_map, b.label_map)
    assert (a.objects, a.areas, a.stuff, a.caption) == (b.objects, b.areas, b.stuff, b.caption)


def test_scene_does_not_depend_on_generation_order() -> None:
    later_first = [generate_scene(i, seed=1) for i in (2, 1, 0)]
    in_order = [generate_scene(i, seed=1) for i in (0, 1, 2)]
    for x, y in zip(reversed(later_first), in_order, strict=True):
        assert np.array_equal(x.image, y.image)


def test_different_seeds_or_indices_differ() -> None:
    base = generate_scene(0, seed=0).image
    assert not np.array_equal(base, generate_scene(1, seed=0).image)
    assert not np.array_equal(base, generate_scene(0, seed=1).image)


@pytest.mark.parametrize("index", range(12))
def test_label_map_is_consistent_with_tags(index: int) -> None:
    scene = generate_scene(index, seed=11)
    assert scene.image.shape == (224, 224, 3) and scene.image.dtype == np.uint8
    assert scene.label_map.shape == (224, 224) and scene.label_map.dtype == np.uint8
    present = {OBJECT_CLASSES[v - 1] for v in np.unique(scene.label_map) if v != 0}
    assert present == set(scene.objects)
    assert 1 <= len(scene.objects) <= 4
    assert len(set(scene.objects)) == len(scene.objects)
    counts = [int((scene.label_map == OBJECT_CLASSES.index(c) + 1).sum()) for c in scene.objects]
    assert counts == list(scene.areas)
    assert counts == sorted(counts, reverse=True)  # objects are listed largest first
    assert scene.salient == scene.objects[0]
    assert set(scene.stuff) <= set(STUFF_CLASSES) and 1 <= len(scene.stuff) <= 2
    # Captions name the salient object, or (rarely) only the stuff.
    assert scene.salient in scene.caption or any(s in scene.caption for s in scene.stuff)


def test_stream_has_small_objects_and_every_class_is_sometimes_salient() -> None:
    scenes = [generate_scene(i, seed=2) for i in range(120)]
    salient = {s.salient for s in scenes}
    assert len(salient) >= 10
    smallest = min(a for s in scenes for a in s.areas)
    assert smallest < 0.01 * 224 * 224  # some objects cover under 1% of the image
    captions = [s.caption for s in scenes]
    only_salient = sum(not any(o in c for o in s.objects[1:]) for s, c in zip(scenes, captions, strict=True))
    assert only_salient > 0.6 * len(scenes)  # the salience bias of web captions


def test_folder_layout_round_trips(tmp_path) -> None:
    root = write_folder_dataset(tmp_path / "shapes", count=3, seed=4, start=10)
    classes, records = read_folder_dataset(root)
    assert classes == list(OBJECT_CLASSES)
    assert sorted(records) == ["000010", "000011", "000012"]
    for image_id, record in records.items():
        scene = generate_scene(int(image_id), seed=4)
        image = np.asarray(Image.open(root / "images" / f"{image_id}.png"))
        labels_img = Image.open(root / "labels" / f"{image_id}.png")
        assert labels_img.mode == "L"
        assert np.array_equal(image, scene.image)
        assert np.array_equal(np.asarray(labels_img), scene.label_map)
        assert record["tags"] == list(scene.objects)
        assert record["labels"] == [classes.index(t) + 1 for t in record["tags"]]
    manifest = json.loads((root / "tags.json").read_text())
    assert manifest["background"] == list(STUFF_CLASSES) and manifest["seed"] == 4


def test_shapes_vocabulary_matches_the_generator() -> None:
    vocab = load_vocabulary("shapes")
    assert vocab.classes == OBJECT_CLASSES
    assert vocab.background == STUFF_CLASSES


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_synthetic.py"
    spec = importlib.util.spec_from_file_location("bench_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_average_precision_by_hand() -> None:
    bench = _bench_module()
    # Ranking: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3.
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    positive = np.array([True, False, True, False])
    assert bench.average_precision(scores, positive) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(bench.average_precision(scores, np.zeros(4, bool)))
    truth = np.stack([positive, ~positive], 1)
    m, aps = bench.mean_ap(np.stack([scores, -scores], 1), truth)
    assert aps[1] == pytest.approx((1 + 2 / 3) / 2)  # ranking 3 (pos), 2, 1 (pos), 0
    assert m == pytest.approx(100 * (aps[0] + aps[1]) / 2)
    # A perfect segmentation has mIoU 100; ignore (255) pixels do not count.
    conf = np.zeros((3, 3), np.int64)
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    bench.confusion_iou(np.where(labels == 255, 0, labels), labels, 3, conf)
    assert bench.miou(conf) == pytest.approx(100.0)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "shapes"


def test_shipped_examples_are_the_generator_output() -> None:
    classes, records = read_folder_dataset(EXAMPLES)
    assert classes == list(OBJECT_CLASSES)
    manifest = json.loads((EXAMPLES / "tags.json").read_text())
    for image_id, record in records.items():
        scene = generate_scene(int(image_id), seed=manifest["seed"])
        assert np.array_equal(np.asarray(Image.open(EXAMPLES / "images" / f"{image_id}.png")), scene.image)
        assert np.array_equal(np.asarray(Image.open(EXAMPLES / "labels" / f"{image_id}.png")), scene.label_map)
        assert record["tags"] == list(scene.objects)


def test_shapes_demo_ships_in_the_package_and_loads_offline(tmp_path, monkeypatch) -> None:
    from tagclip_cli.backbone import WEIGHTS_DIR, builtin_models, load_backbone

    config = json.loads((WEIGHTS_DIR / "shapes-demo.json").read_text())
    assert config["quick_gelu"] is True and config["text_cfg"]["vocab_size"] == 49408
    assert (WEIGHTS_DIR / "shapes-demo.safetensors").stat().st_size < 20_000_000
    assert "shapes-demo" in builtin_models()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = load_backbone(model="shapes-demo", device="cpu", cache_dir=tmp_path)
    assert bb.native_grid == (14, 14) and bb.native_size == 224 and bb.num_layers >= 6
    assert bb.weights.startswith("builtin:shapes-demo:")  # weights hash in the identity (text cache key)
    # Trained, not random: the class token names the salient object of most example scenes.
    text = bb.text_classifier(OBJECT_CLASSES, ("a photo of a {}.",))
    _, records = read_folder_dataset(EXAMPLES)
    import torch

    mean, std = torch.tensor(bb.mean)[:, None, None], torch.tensor(bb.std)[:, None, None]
    pixels = torch.stack(
        [
            (torch.from_numpy(np.asarray(Image.open(EXAMPLES / "images" / f"{i}.png"))).permute(2, 0, 1) / 255 - mean)
            / std
            for i in records
        ]
    )
    top = (bb.encode_image(pixels) @ text.T).argmax(dim=1).tolist()
    hits = sum(OBJECT_CLASSES[t] == r["salient"] for t, r in zip(top, records.values(), strict=True))
    assert hits >= len(records) // 2


@pytest.mark.parametrize("index", range(6))
def test_stuff_map_names_the_scene_stuff_and_fills_the_background(index: int) -> None:
    scene = generate_scene(index, seed=11)
    assert scene.stuff_map.shape == (224, 224) and scene.stuff_map.dtype == np.uint8
    present = {STUFF_CLASSES[v] for v in np.unique(scene.stuff_map)}
    assert present == set(scene.stuff)
    if len(scene.stuff) == 2:  # upper stuff above the horizon, lower stuff below it, per column
        upper, lower = (STUFF_CLASSES.index(s) for s in scene.stuff)
        assert (scene.stuff_map[0] == upper).all() and (scene.stuff_map[-1] == lower).all()
