"""What a method is: the `Method` protocol (its facts and its builder), the `Segments` protocol
(what a built mask method does with a batch) and `SegOutput` (one image's result).

Shapes: images are normalised (3, H', W') tensors at the model's size; a label map is (H, W) int32
at the original image size, 0 = background and c + 1 = vocabulary class c.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from tagclip_cli.backbone import Backbone
    from tagclip_cli.quirks import Quirks
    from tagclip_cli.tagclip import TagCLIPConfig, TagOutput
    from tagclip_cli.vocab import Vocabulary

KINDS = ("tags", "masks")
# The dataset settings of `segment --setting` (docs/algorithm.md §11); a method maps each to its values.
SETTINGS = ("voc", "coco", "cocostuff")
# The segment command's per-method options (`methods.configure` hands each to the methods that
# name it in `Method.options`): the CRF, saved cams, MaskCLIP's two refinements, ResCLIP on a dense
# baseline (rcs).
SEGMENT_OPTIONS = ("crf", "save_cams", "key_smoothing", "prompt_denoising", "rcs")


@dataclass
class SegOutput:
    """Segmentation of one image.

    label_map: (H, W) int32 at the original image size, 0 = background, c + 1 = vocabulary class c.
    mask_scores: {label: score} for every label present (each method says what its score is).
    tags: the foreground classes segmented (from tags) or present (methods without tags).
    cams: (K, gh, gw) normalised refined cams on the grid (CLS-SEG). raw_cams: (K, gh, gw)
    normalised Grad-CAMs before CAA. tag_output: TagCLIP's result when it ran in this pass.
    saved_cams: the float16 cams to write with --save-cams (numpy, on the CPU) that the label map
    was made from."""

    label_map: np.ndarray
    mask_scores: dict[int, float]
    tags: list[int]
    cams: Tensor | None = None
    raw_cams: Tensor | None = None
    tag_output: TagOutput | None = field(default=None, repr=False)
    saved_cams: np.ndarray | None = field(default=None, repr=False)


@runtime_checkable
class Segments(Protocol):
    """A built mask method: one backbone, one vocabulary, one config.

    needs_rgb: whether `segment` needs rgb (the pipeline then keeps each image's RGB pixels).
    A runner that reads the dense forward's attention maps declares which with `map_needs()`
    returning a `backbone.MapNeeds` (kept layer ranges, readers fed every layer's map); the dense
    forward makes no map that no method of the pass declared (`methods.tagged.TaggedSegments`,
    `tagclip.Tagger.map_needs`)."""

    vocab: Vocabulary
    needs_rgb: bool

    def segment(
        self,
        images: Sequence[Tensor],
        sizes: Sequence[tuple[int, int]],
        tags: Sequence[Sequence[int]] | None = None,
        rgb: Callable[[int], np.ndarray] | None = None,
        keep_cams: bool = False,
    ) -> list[SegOutput]:
        """One SegOutput per image. images: normalised (3, H', W'), H' and W' multiples of the patch
        size; sizes: the (height, width) of each label map; tags: foreground class indices per
        image (None: the method finds its own, e.g. by running TagCLIP); rgb(i): image i as
        (H, W, 3) uint8."""
        ...


@runtime_checkable
class Method(Protocol):
    """A method's facts (what the CLI and the API list and check) and its builder.

    name: the `--method` value; kind: "tags" or "masks"; summary: one line for help texts;
    needs_tags: a mask method that segments TagCLIP's tags (run in the same pass, or read from
    `--tags FILE`); needs_rgb: always needs the decoded RGB image; options: the names in
    `SEGMENT_OPTIONS` it accepts; settings: the dataset settings it has values for."""

    name: str
    kind: str
    summary: str
    needs_tags: bool
    needs_rgb: bool
    options: frozenset[str]
    settings: tuple[str, ...]

    def config(self, setting: str = "voc", **options: Any) -> Any:
        """The method's frozen config for a dataset setting (its published values), with the
        given `SEGMENT_OPTIONS` applied."""
        ...

    def build(
        self, backbone: Backbone, vocab: Vocabulary, config: Any, *, quirks: Quirks,
        tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True,
    ) -> Any:
        """The runner: a `Segments` for kind "masks" (tagclip: TagCLIP's config when it runs in
        the same pass; run_tagclip False: the tags always come from the caller), a
        `tagclip.Tagger` for kind "tags"."""
        ...

    def record(self, config: Any, quirks: Quirks) -> dict:
        """The config as the run record stores it (JSON types; compared on resume)."""
        ...
