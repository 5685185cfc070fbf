"""PIAA (docs/algorithm.md §13) as a method of kind "tags" that fits before it scores: the
algorithm lives in tagclip_cli/piaa.py; this module gives its facts and registers it. The fit
pass over a collection is the job layer's (`annotate --method piaa`, jobs/fit.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tagclip_cli.backbone import Backbone
from tagclip_cli.methods.registry import register
from tagclip_cli.piaa import PIAA_SETTINGS, Piaa, PiaaConfig
from tagclip_cli.quirks import Quirks
from tagclip_cli.vocab import BUILTIN_DIR, Vocabulary

# The dense variants whose last-block patch tokens PIAA can use (`--dense`).
PIAA_DENSE = ("sclip", "clearclip", "naclip")


def builtin_name(vocab: Vocabulary) -> str | None:
    """The built-in vocabulary's name (voc, coco, ...) when vocab is one, else None."""
    source = Path(vocab.source)
    return source.stem if source.parent == BUILTIN_DIR else None


class PiaaMethod:
    """The `Method` of PIAA (`piaa.Piaa`). needs_fit: a fit pass over a collection comes first."""

    name = "piaa"
    kind = "tags"
    summary = "PIAA: a patch-level discriminant fitted on the unlabelled collection, then class scores and tags"
    needs_tags = False
    needs_rgb = False
    needs_fit = True
    options: frozenset[str] = frozenset()
    settings = PIAA_SETTINGS

    def config(self, setting: str = "voc", **options) -> PiaaConfig:
        """The authors' constants for a dataset setting (voc, coco, nus), options replacing fields."""
        return PiaaConfig.published(setting, **options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: PiaaConfig, *, quirks: Quirks,
              tagclip=None, run_tagclip: bool = True) -> Piaa:
        return Piaa(backbone, vocab, config, builtin=builtin_name(vocab))  # no quirk of its own (Q5: §10)

    def record(self, config: PiaaConfig, quirks: Quirks) -> dict:
        """PiaaConfig's fields but the per-class thresholds (recorded as "thresholds"), then the
        quirks flag."""
        fields = {k: v for k, v in asdict(config).items() if k != "class_thresholds"}
        return {"method": self.name, **fields, "reference_compat": quirks.reference_compat}


PIAA = register(PiaaMethod())
