"""The MaskCLIP baseline (docs/algorithm.md §9): per-patch class scores of the value-path dense
features (the same dense forward as TagCLIP's), optionally with MaskCLIP's key smoothing and prompt
denoising, upsampled and argmaxed. Run with TagCLIP in the same pass, it also gives the tags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli.backbone import Backbone, DenseOutput
from tagclip_cli.cams import _mean_by_label, _row_bands, resize_bilinear
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS, SegOutput
from tagclip_cli.methods.registry import register
from tagclip_cli.methods.tagged import TaggedSegments
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig, tagclip_templates
from tagclip_cli.vocab import Vocabulary


@dataclass(frozen=True)
class MaskClipConfig:
    """MaskCLIP's options, off by default (the baseline as the TagCLIP paper runs it).

    background: the background names of the classifier when TagCLIP does not run in the same pass
    (None = the vocabulary's; the cocostuff setting: "background"); with TagCLIP, its classifier."""

    key_smoothing: bool = False  # smooth predictions with last-layer key similarity
    key_smoothing_threshold: float = 1.0  # ... at positions whose best probability is below this
    prompt_denoising: bool = False  # drop classes whose best probability is below ...
    prompt_denoising_threshold: float = 0.5
    background: tuple[str, ...] | None = None
    setting: str = "voc"  # the dataset setting it was made for (the run record lists it)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise UsageError(f"unknown setting '{self.setting}' (choose from {', '.join(SETTINGS)})")


# ---- pure functions -------------------------------------------------------------------------------

def maskclip_scores(
    patch_features: Tensor,
    text: Tensor,
    logit_scale: float,
    keys: Tensor | None = None,
    prompt_denoising: float | None = None,
    key_smoothing: float | None = None,
) -> tuple[Tensor, Tensor]:
    """MaskCLIP's per-patch class scores from value-path features (N, D) and text (C, D).

    Returns (decision scores (N, C), probabilities (N, C)). Without options the decision scores are
    the cosine logits. prompt_denoising=t: classes whose best softmax probability (of logit_scale *
    cos) over all patches is below t get logit -100 (dropped). key_smoothing=t (needs keys (N, W),
    the last block's keys): patches whose best probability is below t take the key-cosine-weighted
    sum of all patches' probabilities (unnormalised, as MaskCLIP). The probabilities are the
    softmax after denoising, before smoothing (what the masks' scores report)."""
    logits = F.normalize(patch_features.float(), dim=-1) @ text.T
    if prompt_denoising is not None:
        best = (logit_scale * logits).softmax(dim=-1).amax(dim=0)
        logits = torch.where((best < prompt_denoising)[None, :], torch.full_like(logits, -100.0), logits)
    probs = (logit_scale * logits).softmax(dim=-1)
    if key_smoothing is None:
        return logits, probs
    if keys is None:
        raise ValueError("key smoothing needs the last block's keys")
    k = F.normalize(keys.float(), dim=-1)
    smoothed = (k @ k.T) @ probs
    smooth = probs.amax(dim=-1, keepdim=True) < key_smoothing
    return torch.where(smooth, smoothed, probs), probs


def label_map_from_scores(
    scores: Tensor, grid: tuple[int, int], labels: Sequence[int], size: tuple[int, int], values: Tensor | None = None
) -> tuple[np.ndarray, dict[int, float]]:
    """Argmax of bilinearly upsampled per-patch scores (N, C): label map (H, W) with labels[c] for
    class c (0 for background classes), and per label the mean (upsampled) `values` (N, C; default
    the scores) of the winning class over its pixels."""
    c = scores.shape[1]
    maps = scores.T.reshape(c, *grid)
    value_maps = maps if values is None else values.T.reshape(c, *grid)
    height, width = size
    out = np.zeros((height, width), dtype=np.int32)
    lookup = torch.tensor(list(labels), dtype=torch.long)
    sums = torch.zeros(c, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for band in _row_bands(height, width, c * (1 if values is None else 2)):
        winner = resize_bilinear(maps, size, band).argmax(dim=0)
        value = resize_bilinear(value_maps, size, band).gather(0, winner[None])[0]
        winner = winner.cpu()
        out[band] = lookup[winner].numpy()
        sums += torch.bincount(winner.flatten(), weights=value.cpu().double().flatten(), minlength=c)
        counts += torch.bincount(winner.flatten(), minlength=c).double()
    return out, _mean_by_label(sums, counts, labels)



# ---- batching -------------------------------------------------------------------------------------

class MaskClipSegments(TaggedSegments):
    """MaskCLIP on batches of preprocessed images (see `TaggedSegments`): with TagCLIP in the same
    pass its 85-template classifier, else the same templates over the classes and background."""

    def __init__(self, backbone: Backbone, vocab: Vocabulary, config: MaskClipConfig | None = None,
                 tagclip: TagCLIPConfig | None = None, quirks: Quirks | None = None, run_tagclip: bool = True) -> None:
        super().__init__(backbone, vocab, tagclip, quirks or Quirks(), run_tagclip)
        self.config = config or MaskClipConfig()
        if self.tagger is not None:
            self.text = self.tagger.text  # the classifier TagCLIP already built
        else:
            background = vocab.background if self.tagclip.use_background else ()
            if self.config.background is not None:
                background = self.config.background
            self.text = backbone.text_classifier(tuple(vocab.classes) + tuple(background), tagclip_templates())

    @torch.inference_mode()
    def _one(self, dense: DenseOutput, tags: list[int], size: tuple[int, int], rgb: np.ndarray | None,
             keep_cams: bool) -> SegOutput:
        cfg = self.config
        nf = self.vocab.num_classes
        keys = None
        if cfg.key_smoothing:
            if dense.pre_last is None:
                raise ValueError("key smoothing needs the tokens entering the last block")
            keys = self.backbone.block_keys(self.backbone.num_layers - 1, dense.pre_last[None])[0, 1:]
        scores, probs = maskclip_scores(
            dense.tokens[1:], self.text, self.backbone.logit_scale, keys,
            cfg.prompt_denoising_threshold if cfg.prompt_denoising else None,
            cfg.key_smoothing_threshold if cfg.key_smoothing else None,
        )
        labels = [c + 1 if c < nf else 0 for c in range(scores.shape[1])]
        label_map, mask_scores = label_map_from_scores(scores, dense.grid, labels, size, probs)
        present = sorted(label - 1 for label in mask_scores)
        return SegOutput(label_map, mask_scores, present)


# ---- the method -----------------------------------------------------------------------------------

class MaskClip:
    """The `Method` of the MaskCLIP baseline. It takes TagCLIP's tags (run here, or --tags) only to
    report them; its masks do not depend on them."""

    name = "maskclip"
    kind = "masks"
    summary = "MaskCLIP (baseline): value-path dense logits, argmax"
    needs_tags = True
    needs_rgb = False
    options = frozenset({"key_smoothing", "prompt_denoising"})
    settings = SETTINGS

    def config(self, setting: str = "voc", **options) -> MaskClipConfig:
        """Options: key_smoothing, prompt_denoising (bools)."""
        background = ("background",) if setting == "cocostuff" else None
        return MaskClipConfig(setting=setting, background=background, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: MaskClipConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> MaskClipSegments:
        return MaskClipSegments(backbone, vocab, config, tagclip, quirks, run_tagclip)

    def record(self, config: MaskClipConfig, quirks: Quirks) -> dict:
        from tagclip_cli.methods.record import legacy_record

        return legacy_record(self.name, quirks, setting=config.setting, maskclip=config)


MASKCLIP = register(MaskClip())
