"""What CLS-SEG and MaskCLIP share: they work on TagCLIP's dense forward (docs/algorithm.md §1)
and on its tags. Given no tags, TagCLIP tags the batch and its dense forward feeds the method too;
given tags (`--tags FILE`), one dense forward per image runs here alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from tagclip_cli.backbone import Backbone, DenseOutput, MapNeeds
from tagclip_cli.methods.base import SegOutput
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig, Tagger, TagOutput, dense_per_image
from tagclip_cli.vocab import Vocabulary


class TaggedSegments:
    """A mask method on TagCLIP's dense forward; a subclass defines `_one` for one image.

    tagger: TagCLIP, run in `segment` when no tags are given (None with run_tagclip False)."""

    needs_rgb = False

    def __init__(self, backbone: Backbone, vocab: Vocabulary, tagclip: TagCLIPConfig | None, quirks: Quirks,
                 run_tagclip: bool) -> None:
        self.backbone = backbone
        self.vocab = vocab
        self.tagclip = tagclip or TagCLIPConfig()
        self.quirks = quirks
        self.tagger = Tagger(backbone, vocab, self.tagclip, quirks=quirks) if run_tagclip else None

    def segment(
        self, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], tags: Sequence[Sequence[int]] | None = None,
        rgb: Callable[[int], np.ndarray] | None = None, keep_cams: bool = False,
    ) -> list[SegOutput]:
        """Segment normalised images (each (3, H', W'), multiples of the patch size).

        sizes: the (height, width) of each label map (the original image size). tags: foreground
        class indices per image (None = run TagCLIP here). rgb(i): the (H, W, 3) uint8 image i,
        needed when needs_rgb (the CRF). keep_cams keeps the grid cams in the outputs (CLS-SEG)."""
        tag_outputs: list[TagOutput | None]
        if tags is None:
            if self.tagger is None:
                raise ValueError("no tags given and TagCLIP was not set up (run_tagclip=False)")
            tag_outputs = list(self.tagger.tag(images, keep_dense=True, needs=self.map_needs()))
            denses = [out.dense for out in tag_outputs]
            tags = [out.tags for out in tag_outputs]
        else:
            tag_outputs = [None] * len(images)
            denses = self._dense(images)
        results = []
        for i, (dense, image_tags, size) in enumerate(zip(denses, tags, sizes, strict=True)):
            image_rgb = rgb(i) if self.needs_rgb and rgb is not None else None
            if self.needs_rgb and image_rgb is None:
                raise ValueError("the CRF needs the RGB images (rgb=...)")
            out = self._one(dense, list(image_tags), tuple(size), image_rgb, keep_cams)
            out.tag_output = tag_outputs[i]
            results.append(out)
        return results

    def map_needs(self) -> MapNeeds:
        """The attention maps the method itself reads of the dense forward (`MapNeeds`, a declared
        need; TagCLIP's own come on top when it runs in the pass): none unless a subclass says."""
        return MapNeeds()

    def _one(self, dense: DenseOutput, tags: list[int], size: tuple[int, int], rgb: np.ndarray | None,
             keep_cams: bool) -> SegOutput:
        raise NotImplementedError

    @torch.inference_mode()
    def _dense(self, images: Sequence[Tensor]) -> list[DenseOutput]:
        """Dense forwards (same-size images batched), one DenseOutput per image with pre_last."""
        out: list[DenseOutput | None] = [None] * len(images)
        q1 = self.quirks.q1_fp16_positions
        for i, one in dense_per_image(self.backbone, images, q1, keep_pre_last=True, needs=self.map_needs()):
            out[i] = one  # quirk Q1 (docs/algorithm.md §10) in the dense forward
        return out  # type: ignore[return-value]
