"""The annotate pipeline: sources -> decoded images -> backbone -> TagCLIP -> Parquet parts -> output.

The CLI builds an `AnnotateOptions` and calls `run_annotate`; nothing here parses arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from tagclip_cli import __version__
from tagclip_cli.backbone import Backbone, load_backbone
from tagclip_cli.data import ImageItem, Preprocess, iter_records, to_device
from tagclip_cli.faults import OomSplitter
from tagclip_cli.jobs import JobSpec, Placement, Summary, run_job, session
from tagclip_cli.tagclip import TagCLIPConfig, Tagger
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
    out: Path | None  # None: JSON Lines on stdout
    model: ModelOptions
    tagclip: TagCLIPConfig
    batch_size: int = 8
    workers: int = 2
    max_side: int | None = None
    part_size: int = 256
    overwrite: bool = False
    fail_fast: bool = False
    placement: Placement = field(default_factory=Placement)  # torchrun rank / --shard (jobs.py)
    stdout: TextIO | None = None  # where --out - writes (default sys.stdout)


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
    """Tag every item into opts.out (Parquet) or stdout (JSON Lines), resuming an interrupted run of
    the same config; under torchrun / --shard only this rank's share (jobs.py)."""
    with session(opts.placement, opts.model.device) as sess:
        opts.model.device = sess.device
        backbone = opts.model.load()
        config = run_config(backbone, opts.vocab, opts.tagclip, opts.max_side)
        tagger = Tagger(backbone, opts.vocab, opts.tagclip)
        preprocess = Preprocess(backbone.patch_size, backbone.mean, backbone.std, opts.max_side)
        spec = JobSpec(
            items=opts.items, out=opts.out, config=config, schema=tags_schema(config),
            batch_size=opts.batch_size, part_size=opts.part_size, overwrite=opts.overwrite, fail_fast=opts.fail_fast,
        )
        pin = backbone.device.type == "cuda"

        downscaled = [0]  # images the --max-side cap shrank (reported at the end)

        def records(todo: Sequence[ImageItem]):
            for record in iter_records(todo, preprocess, opts.workers, pin_memory=pin):
                downscaled[0] += record["downscaled"]
                yield record

        # On out-of-memory a batch is retried in halves, down to single images (faults.py).
        process = OomSplitter(lambda batch: tag_records(tagger, to_device(batch, backbone.device)))
        share = sum(1 for it in opts.items if opts.placement.owns(it, spec.window))
        show = progress if progress and opts.placement.leader else None
        ctx = show(share) if show else nullcontext(None)
        with ctx as advance, torch.inference_mode():
            summary = run_job(spec, sess, records, process, progress=advance, stdout=opts.stdout)
        log_downscaled(downscaled[0], opts.max_side)
        return summary


def log_downscaled(count: int, max_side: int | None) -> None:
    """The note for images the --max-side cap shrank before the forward pass."""
    if count:
        log.info("%d image(s) longer than --max-side %d px were downscaled for the model (width/height in "
                 "the output are the original sizes; raise --max-side to keep more detail)", count, max_side)
