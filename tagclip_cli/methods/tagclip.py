"""TagCLIP (docs/algorithm.md §2-§6) as a method of kind "tags": the algorithm lives in
tagclip_cli/tagclip.py; this module gives its facts and registers it."""

from __future__ import annotations

from dataclasses import asdict

from tagclip_cli.backbone import Backbone
from tagclip_cli.errors import UsageError
from tagclip_cli.methods.base import SETTINGS
from tagclip_cli.methods.registry import register
from tagclip_cli.quirks import Quirks
from tagclip_cli.tagclip import TagCLIPConfig, Tagger
from tagclip_cli.vocab import Vocabulary


class TagClip:
    """The `Method` of TagCLIP (`tagclip.Tagger`)."""

    name = "tagclip"
    kind = "tags"
    summary = "TagCLIP: coarse patch scores, DMAR, CWR, fused class scores and tags, the paper's"
    needs_tags = False
    needs_rgb = False
    options: frozenset[str] = frozenset()
    settings = SETTINGS

    def config(self, setting: str = "voc", **options) -> TagCLIPConfig:
        """The paper's values; cocostuff: the reference's COCO-Stuff values (`TagCLIPConfig.coco_stuff`)."""
        if setting not in self.settings:
            raise UsageError(f"unknown setting '{setting}' (choose from {', '.join(self.settings)})")
        return TagCLIPConfig.coco_stuff(**options) if setting == "cocostuff" else TagCLIPConfig(**options)

    def build(self, backbone: Backbone, vocab: Vocabulary, config: TagCLIPConfig, *, quirks: Quirks,
              tagclip: TagCLIPConfig | None = None, run_tagclip: bool = True) -> Tagger:
        return Tagger(backbone, vocab, config, quirks=quirks)

    def record(self, config: TagCLIPConfig, quirks: Quirks) -> dict:
        """TagCLIPConfig's fields, then the quirks flag (the layout of earlier versions)."""
        return {**asdict(config), "reference_compat": quirks.reference_compat}


TAGCLIP = register(TagClip())
