"""Regression guard on the shipped shapes-demo model: TagCLIP must beat its own class token.

The demo model is trained so that its value-path patch tokens name the object under them (see
benchmarks/train_demo_clip.py), the property of real CLIP that TagCLIP rests on. On a small fixed set
of held-out synthetic scenes (stream 3000: not training's 0, the benchmark's 1000 or the alignment
diagnostic's 2000), full TagCLIP (docs/algorithm.md §2-§5) must stay above the class-token
baseline by a margin, and DMAR and CWR must not clearly lower the scores, so that a change that
breaks the coarse scores, DMAR (§3), CWR (§5) or their fusion fails the suite. Margins were measured on the
weights shipped with this test and set safely below the measured gaps (numbers in the asserts).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
STREAM = 3000
COUNT = 24
# Measured on the shipped weights (mAP all / non-salient, 24 scenes): class token 84.6 / 63.2,
# coarse 98.8 / 98.6, coarse + DMAR 99.6 / 99.8, full TagCLIP 99.6 / 99.8 (the two weights shipped
# before them: 82.3 / 59.9, 95.9 / 92.7, 96.1 / 93.3, 96.0 / 93.0; and 73.6 / 45.4, 88.3 / 81.8,
# 90.6 / 82.1, 90.4 / 82.1). The full-vs-class-token margins stay below the measured gaps of all three
# (15.0 / 36.6 now, 13.7 / 33.1 and 16.8 / 36.7 before). DMAR's gain on these scenes is small (+0.8 /
# +1.2; before +0.2 / +0.6 and +2.3 / +0.3), so its guard only fails a clear loss; full equals
# coarse + DMAR here (the patch scores leave CWR little to add), so CWR's guard too only fails a
# clear loss.
MARGIN_ALL = 10.0
MARGIN_NON_SALIENT = 12.0
DMAR_GAIN_ALL = -2.0
DMAR_GAIN_NON_SALIENT = -8.0
CWR_LOSS_ALLOWED = 2.0


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_synthetic", BENCH / "bench_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> dict[str, tuple[float, float]]:
    """(mAP all, mAP non-salient) per method on the fixed scenes."""
    from tagclip_cli.backbone import load_backbone
    from tagclip_cli.synthetic import OBJECT_CLASSES, generate_scene
    from tagclip_cli.vocab import load_vocabulary

    bench = _bench()
    bb = load_backbone(model="shapes-demo", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    vocab = load_vocabulary("shapes")
    scenes = [generate_scene(i, seed=STREAM) for i in range(COUNT)]
    images = [bench.normalise(s, bb.mean, bb.std) for s in scenes]
    truth = np.zeros((COUNT, len(OBJECT_CLASSES)), bool)
    salient = np.zeros_like(truth)
    for i, s in enumerate(scenes):
        truth[i, [OBJECT_CLASSES.index(o) for o in s.objects]] = True
        salient[i, OBJECT_CLASSES.index(s.salient)] = True
    runs = {"class token": bench.run_global(bb, vocab, images, 16)}
    for name, dmar, cwr in [("coarse", False, False), ("coarse + DMAR", True, False), ("full", True, True)]:
        runs[name] = bench.run_tagger(bb, vocab, images, 16, use_dmar=dmar, use_cwr=cwr)[0]
    return {
        name: (bench.mean_ap(scores, truth)[0], bench.mean_ap(scores, truth, ~salient)[0])
        for name, scores in runs.items()
    }


def _report(maps: dict[str, tuple[float, float]]) -> str:
    return "; ".join(f"{name}: {a:.1f} / {b:.1f}" for name, (a, b) in maps.items())


def test_full_tagclip_beats_the_class_token_overall_and_on_non_salient_objects(maps) -> None:
    full, cls = maps["full"], maps["class token"]
    assert full[0] - cls[0] >= MARGIN_ALL, _report(maps)
    assert full[1] - cls[1] >= MARGIN_NON_SALIENT, _report(maps)


def test_dmar_does_not_undo_the_coarse_scores(maps) -> None:
    dmar, coarse = maps["coarse + DMAR"], maps["coarse"]
    assert dmar[0] - coarse[0] >= DMAR_GAIN_ALL, _report(maps)
    assert dmar[1] - coarse[1] >= DMAR_GAIN_NON_SALIENT, _report(maps)


def test_cwr_and_the_fusion_do_not_undo_dmar(maps) -> None:
    full, dmar = maps["full"], maps["coarse + DMAR"]
    assert full[0] >= dmar[0] - CWR_LOSS_ALLOWED, _report(maps)
    assert full[1] >= dmar[1] - CWR_LOSS_ALLOWED, _report(maps)
