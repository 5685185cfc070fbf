"""cams.py (the label rule shared by segment and `evaluate --cams`), saved cam files, the COCO-Stuff
setting and vocabulary (docs/algorithm.md §8, §11)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tagclip_cli import evaluate as ev
from tagclip_cli.cams import (
    CamRule,
    crf_available,
    crf_label_map_upsampled,
    label_map_from_cams,
    label_map_from_upsampled,
    parse_thresholds,
    resize_bilinear,
)
from tagclip_cli.errors import UsageError
from tagclip_cli.formats import FormatError, read_cam_file, read_cams_index
from tagclip_cli.methods.clses import ClsSegConfig, ClsSegSegments
from tagclip_cli.tagclip import TagCLIPConfig
from tagclip_cli.vocab import load_vocabulary
from tagclip_cli.writers import cam_file_path, write_cam_file, write_cams_index

# ---- --bg-threshold -------------------------------------------------------------------------------


def test_parse_thresholds_range_list_and_single():
    assert parse_thresholds("0.3:0.7:0.05") == [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]
    assert parse_thresholds("0.05:0.6:0.05")[-1] == 0.6 and len(parse_thresholds("0.05:0.6:0.05")) == 12
    assert parse_thresholds("0.4,0.5") == [0.4, 0.5]
    assert parse_thresholds(" 0.5 ") == [0.5]


@pytest.mark.parametrize("spec", ["0.7:0.3:0.1", "0.3:0.7:0", "0.3:0.7", "a:b:c", "1.5", "0.2,x", "", "-0.1"])
def test_parse_thresholds_rejects_bad_specs_in_one_line(spec):
    with pytest.raises(UsageError, match="--bg-threshold") as info:
        parse_thresholds(spec)
    assert "\n" not in str(info.value)


# ---- the label rule -------------------------------------------------------------------------------


def test_threshold_half_is_the_power_one_rule_exactly():
    # float16-rounded cams with many values at and around 0.5: argmax([1 - max, cams]) and
    # argmax([0.5, cams]) agree on every pixel (ties to background in both).
    gen = torch.Generator().manual_seed(0)
    cams = torch.rand(3, 40, 50, generator=gen).half().float()
    cams[0, :5] = 0.5
    cams[1, 5:10] = torch.tensor(0.5, dtype=torch.float16).float() + 2.0**-11
    power, _ = label_map_from_upsampled(cams, [4, 7, 9])
    half, _ = label_map_from_upsampled(cams, [4, 7, 9], background_threshold=0.5)
    np.testing.assert_array_equal(power, half)
    assert (power == 0).any() and (power > 0).any()


def test_constant_threshold_and_no_background_hand_computed():
    cams = torch.tensor([[[0.2, 0.6, 0.9, 0.1]], [[0.3, 0.5, 0.95, 0.0]]])  # (2, 1, 4)
    low, _ = label_map_from_upsampled(cams, [1, 2], background_threshold=0.25)
    assert low.tolist() == [[2, 1, 2, 0]]
    high, _ = label_map_from_upsampled(cams, [1, 2], background_threshold=0.7)
    assert high.tolist() == [[0, 0, 2, 0]]
    none, scores = label_map_from_upsampled(cams, [1, 2], label_background=False)  # COCO-Stuff: a tag everywhere
    assert none.tolist() == [[2, 1, 2, 1]]
    assert scores == pytest.approx({1: (0.6 + 0.1) / 2, 2: (0.3 + 0.95) / 2})


def test_upsampled_rule_equals_the_grid_rule():
    gen = torch.Generator().manual_seed(1)
    grid = torch.rand(4, 3, 5, generator=gen)
    for kw in ({}, {"background_threshold": 0.6}, {"label_background": False}):
        from_grid, grid_scores = label_map_from_cams(grid, [3, 1, 8, 2], (37, 61), **kw)
        full, full_scores = label_map_from_upsampled(resize_bilinear(grid, (37, 61)), [3, 1, 8, 2], **kw)
        np.testing.assert_array_equal(from_grid, full)
        assert grid_scores == pytest.approx(full_scores)


@pytest.mark.skipif(not crf_available(), reason="pydensecrf2 not installed")
def test_crf_without_background_label_gives_every_pixel_a_tag():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, 15:] = 255
    cams = torch.zeros(2, 20, 30)
    cams[0, :, :15] = 0.9
    cams[1, :, 15:] = 0.8
    rule = CamRule(label_background=False)
    labels, _ = crf_label_map_upsampled(rgb, cams, [5, 9], rule)
    assert set(np.unique(labels)) == {5, 9}
    assert (labels[:, :15] == 5).all() and (labels[:, 15:] == 9).all()
    with_bg, _ = crf_label_map_upsampled(rgb, cams * 0.3, [5, 9], CamRule())  # weak cams: background wins
    assert (with_bg == 0).all()


def test_cam_rule_is_segment_configs_label_rule():
    assert ClsSegConfig().rule == CamRule()  # one set of paper values (CRF parameters included)
    stuff = ClsSegConfig.coco_stuff(save_cams="grid").rule
    assert stuff == dataclasses.replace(CamRule(), label_background=False)


# ---- saved cam files ------------------------------------------------------------------------------


def test_cam_file_round_trip_and_path(tmp_path: Path):
    cams = np.random.default_rng(0).random((3, 7, 9)).astype(np.float16)
    path = cam_file_path(tmp_path / "cams", "sub/2007_000032.jpg")
    assert path == tmp_path / "cams" / "sub" / "2007_000032.npz"
    write_cam_file(path, cams, [4, 0, 19], (7, 9), "sub/2007_000032.jpg", "/data/x.jpg")
    back = read_cam_file(path, num_classes=20)
    assert back.cams.dtype == np.float16
    np.testing.assert_array_equal(back.cams, cams)
    assert back.tags.tolist() == [4, 0, 19] and back.size == (7, 9)
    assert (back.image_id, back.path) == ("sub/2007_000032.jpg", "/data/x.jpg")
    assert not list((tmp_path / "cams" / "sub").glob("*.tmp"))  # atomic: no temp file left
    with pytest.raises(FormatError, match="tag index outside the 5 classes"):
        read_cam_file(path, num_classes=5)
    path.write_bytes(b"not a zip")
    with pytest.raises(FormatError, match=r"2007_000032\.npz: not a cam file"):
        read_cam_file(path)


def test_cams_index_checks(tmp_path: Path):
    index = {"format": "tagclip-cams", "version": 1, "layout": "image", "classes": ["a", "b"],
             "rule": dataclasses.asdict(CamRule())}
    write_cams_index(tmp_path / "d", index)
    write_cams_index(tmp_path / "d", index)  # the same run again (resume): fine
    assert read_cams_index(tmp_path / "d") == index
    with pytest.raises(UsageError, match="holds cams of another run"):
        write_cams_index(tmp_path / "d", {**index, "classes": ["a", "c"]})
    write_cams_index(tmp_path / "d", {**index, "classes": ["a", "c"]}, overwrite=True)
    with pytest.raises(FormatError, match="not a directory of saved cams"):
        read_cams_index(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(FormatError, match="no cams.json"):
        read_cams_index(tmp_path / "e")


# ---- COCO-Stuff: vocabulary and setting (docs/algorithm.md §11) ------------------------------------


def test_coco_stuff_vocabulary_is_the_171_classes_in_reference_order(tmp_path: Path):
    from PIL import Image

    voc = load_vocabulary("coco-stuff")
    used = [i for i in range(182) if i not in ev.COCOSTUFF_UNUSED]
    assert voc.num_classes == 171 and len(set(voc.classes)) == 171 and voc.background == ()
    # position k is stuffthingmaps value used[k]: the names match COCO-Stuff's fine names one to one
    fine = ev.match_classes(voc.classes, [ev.COCOSTUFF_FINE_NAMES[i] for i in used])
    assert fine.pred_to_gt == tuple(range(171))
    # ... and the ground truth of evaluate --gt coco-stuff-27 maps each onto its super-class
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8), mode="L").save(tmp_path / "000000000139.png")
    gt = ev.load_ground_truth("coco-stuff-27", tmp_path)
    coarse = ev.match_classes(voc.classes, gt.map_classes, synonyms=gt.map_synonyms, one_to_one=False)
    assert coarse.pred_to_gt == tuple(ev.COCOSTUFF_FINE_TO_COARSE[i] for i in used)
    assert ev.match_classes(voc.classes, gt.label_classes).pred_to_gt == tuple(range(171))  # tags: fine classes
    renamed = {c: s for c, s in zip(voc.classes, voc.seg_names, strict=True) if c != s}
    assert renamed["person"] == "person with clothes,people,human" and renamed["airplane"] == "aeroplane"
    assert len(renamed) == 13


def test_coco_stuff_settings():
    seg = ClsSegConfig.for_setting("cocostuff")
    assert (seg.caa_layers, seg.box_threshold) == ((-7, 0), 0.7)
    assert seg.rule.label_background is False and seg.cam_background == ("background",)
    tag = TagCLIPConfig.coco_stuff()
    assert (tag.refine_layers, tag.cwr_threshold, tag.tag_threshold, tag.use_background) == ((1, -1), 0.1, 0.1, False)
    with pytest.raises(UsageError, match="voc, coco, cocostuff"):
        ClsSegConfig.for_setting("ade")
    with pytest.raises(UsageError, match="save_cams"):
        ClsSegConfig(save_cams="full")


def test_segmenter_coco_stuff_labels_every_pixel_and_saves_what_it_labelled(tiny_backbone):
    voc = load_vocabulary("coco-stuff")
    seg = ClsSegSegments(tiny_backbone, voc, ClsSegConfig.coco_stuff(save_cams="image"), TagCLIPConfig.coco_stuff())
    assert seg.num_background == 1 and seg.text.shape[0] == 172  # Grad-CAM against "background" alone
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 48, 64, generator=gen)
    (out,) = seg.segment([image], [(45, 61)])
    assert out.label_map.min() >= 1  # no background label
    assert out.saved_cams.dtype == np.float16 and out.saved_cams.shape == (len(out.tags), 45, 61)
    again, _ = label_map_from_upsampled(torch.from_numpy(out.saved_cams.astype(np.float32)),
                                        [t + 1 for t in out.tags], label_background=False)
    np.testing.assert_array_equal(out.label_map, again)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cams-grid"], "give --save-cams too"),
        (["--method", "maskclip", "--save-cams", "cams"], "needs --method clses"),
        (["--save-cams", "a.png"], "exists and is not a directory"),
    ],
)
def test_segment_save_cams_bad_combinations(tmp_path, monkeypatch, extra, message):
    from PIL import Image
    from typer.testing import CliRunner

    from tagclip_cli.cli import app

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    result = CliRunner().invoke(app, ["segment", str(tmp_path), "--vocab", "voc", "--out", "m.json", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.json.parts").exists() and not (tmp_path / "cams").exists()
