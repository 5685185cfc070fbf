"""The annotate pipeline: sources -> decoded images -> backbone -> TagCLIP -> Parquet parts -> output.

The CLI builds an `AnnotateOptions` and calls `run_annotate`; nothing here parses arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tagclip_cli import __version__
from tagclip_cli.backbone import Backbone, load_backbone
from tagclip_cli.data import ImageItem, Preprocess, make_loader
from tagclip_cli.jobs import PartStore, Summary, run_batches
from tagclip_cli.tagclip import Tagger, TagCLIPConfig
from tagclip_cli.vocab import Vocabulary
from tagclip_cli.writers import tag_row, tags_schema

log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    checkpoint: Path | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    model_explicit: bool = False
    fp16_weights: bool = False  # reference-compat: weights rounded through fp16 like the reference loader

    def load(self) -> Backbone:
        return load_backbone(
            self.model,
            self.pretrained,
            self.checkpoint,
            device=self.device,
            cache_dir=self.cache_dir,
            model_explicit=self.model_explicit,
            fp16_weights=self.fp16_weights,
        )


@dataclass
class AnnotateOptions:
    items: Sequence[ImageItem]
    vocab: Vocabulary
    out: Path
    model: ModelOptions
    tagclip: TagCLIPConfig
    batch_size: int = 8
    workers: int = 2
    max_side: int | None = None
    part_size: int = 256
    overwrite: bool = False
    fail_fast: bool = False


def run_config(backbone: Backbone, vocab: Vocabulary, cfg: TagCLIPConfig, max_side: int | None) -> dict:
    """Everything that determines the output; stored in the Parquet metadata and checked on resume."""
    return {
        "tool": "tagclip-cli",
        "tool_version": __version__,
        "model": backbone.identity(),
        "classes": list(vocab.classes),
        "seg_names": list(vocab.seg_names),
        "background": list(vocab.background) if cfg.use_background else [],
        "vocabulary": vocab.source,
        "tagclip": asdict(cfg),
        "max_side": max_side,
    }


def tag_records(tagger: Tagger, records: list[dict]) -> list[dict]:
    """Parquet rows for a batch of decoded records (failed decodes become failed rows)."""
    good = [r for r in records if r["error"] is None]
    outputs = iter(tagger.tag([r["pixels"] for r in good])) if good else iter(())
    names = tagger.vocab.classes
    rows = []
    for rec in records:
        if rec["error"] is not None:
            rows.append(tag_row(rec["item"], rec["width"], rec["height"], rec["error"]))
            continue
        out = next(outputs)
        scores = out.scores.cpu()
        rows.append(tag_row(rec["item"], rec["width"], rec["height"], None, [names[t] for t in out.tags], scores))
    return rows


def run_annotate(opts: AnnotateOptions, progress: Callable[[int, int], object] | None = None) -> Summary:
    """Tag every item into opts.out (Parquet), resuming an interrupted run of the same config."""
    backbone = opts.model.load()
    config = run_config(backbone, opts.vocab, opts.tagclip, opts.max_side)
    store = PartStore(opts.out, config, overwrite=opts.overwrite)
    tagger = Tagger(backbone, opts.vocab, opts.tagclip)
    preprocess = Preprocess(backbone.patch_size, backbone.mean, backbone.std, opts.max_side)
    schema = tags_schema(config)
    pin = backbone.device.type == "cuda"

    def batches(todo: Sequence[ImageItem]):
        return make_loader(todo, preprocess, opts.batch_size, opts.workers, pin_memory=pin)

    ctx = progress(len(opts.items)) if progress else nullcontext(None)
    with ctx as advance, torch.inference_mode():
        summary = run_batches(
            opts.items,
            store,
            batches,
            lambda records: tag_records(tagger, records),
            schema,
            part_size=opts.part_size,
            on_progress=advance,
            fail_fast=opts.fail_fast,
        )
    if opts.fail_fast and summary.failed:
        log.warning("stopped at the first failure (--fail-fast); finished parts are kept in %s", store.dir)
        return summary
    rows = store.merge(schema)
    store.cleanup()
    log.info("wrote %s (%d rows)", opts.out, rows)
    return summary
