"""The batched engine equals the naive, one-image-one-class implementation (benchmarks/naive.py)
to 1e-5 in fp32, on a tiny random CLIP and real photos of mixed sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagclip_cli.data import Preprocess
from tagclip_cli.methods.clses import ClsSegSegments
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import SCENE_TEMPLATES, TagCLIPConfig, Tagger
from tagclip_cli.vocab import load_vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from conftest import sample_photos  # noqa: E402
from naive import NaiveClsSeg, NaiveTagCLIP  # noqa: E402

ATOL = 1e-5
# (width, height) pairs: landscape, portrait, and a size that is not a multiple of the patch size
SIZES = [(200, 150), (150, 200), (200, 150), (170, 131)]


@pytest.fixture(scope="module")
def photos(tiny_backbone) -> list[torch.Tensor]:
    pre = Preprocess(tiny_backbone.patch_size, tiny_backbone.mean, tiny_backbone.std)
    arrays = list(sample_photos().values())
    return [pre(Image.fromarray(arrays[i % len(arrays)]).resize(size)) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def voc():
    return load_vocabulary("voc")


def test_text_classifier_equals_class_by_class_encoding(tiny_backbone, voc):
    names = voc.all_names
    naive = NaiveTagCLIP(tiny_backbone, voc.classes, voc.background, SCENE_TEMPLATES)
    ours = tiny_backbone.text_classifier(names, SCENE_TEMPLATES)
    assert ours.shape == (len(names), tiny_backbone.model.text_projection.shape[1])
    torch.testing.assert_close(ours, naive.text, atol=ATOL, rtol=0)


@pytest.mark.parametrize("reference_compat", [False, True])
def test_tagclip_scores_equal_naive(tiny_backbone, voc, photos, reference_compat):
    tagger = Tagger(tiny_backbone, voc, TagCLIPConfig(), quirks=Quirks(reference_compat))
    # the classifier itself is compared above; here both use the same one
    naive = NaiveTagCLIP(
        tiny_backbone, voc.classes, voc.background, (), text=tagger.text, reference_compat=reference_compat
    )
    outputs = tagger.tag(photos)
    crops = 0
    for image, out in zip(photos, outputs, strict=True):
        ref = naive(image)
        assert out.candidates == ref.candidates
        np.testing.assert_allclose(out.p_local.numpy(), ref.p_local.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(out.scores.numpy(), ref.scores.numpy(), atol=ATOL, rtol=0)
        assert out.tags == ref.tags
        crops += ref.crops_run
    # the comparison exercised CWR (fused scores), not just the local path
    assert crops > 0


def test_clses_cams_and_label_maps_equal_naive(tiny_backbone, voc, photos):
    """CLS-SEG with default settings: TagCLIP's tags, batched Grad-CAMs (one backward for all tags)
    and CAA equal the per-tag-backward loop."""
    segmenter = ClsSegSegments(tiny_backbone, voc)
    naive_tags = NaiveTagCLIP(tiny_backbone, voc.classes, voc.background, (), text=segmenter.tagger.text)
    naive = NaiveClsSeg(naive_tags, segmenter.text)
    sizes = [(h, w) for w, h in SIZES]
    outputs = segmenter.segment(photos, sizes, keep_cams=True)
    tags_seen = 0
    for image, size, out in zip(photos, sizes, outputs, strict=True):
        assert out.tags == naive_tags(image).tags
        ref = naive(image, out.tags, size)
        assert out.cams.shape == ref.cams.shape == (len(out.tags), *out.tag_output.grid)
        np.testing.assert_allclose(out.raw_cams.numpy(), ref.raw_cams.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(out.cams.numpy(), ref.cams.numpy(), atol=ATOL, rtol=0)
        assert out.label_map.shape == size
        np.testing.assert_array_equal(out.label_map, ref.label_map.numpy())
        tags_seen += len(out.tags)
    assert tags_seen > len(photos)  # several tags per image: the batched backward was exercised
