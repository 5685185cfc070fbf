"""The annotate and segment pipelines: sources -> decoded images -> backbone -> TagCLIP (-> CLS-SEG)
-> Parquet parts -> output.

The CLI builds an `AnnotateOptions` / `SegmentOptions` and calls `run_annotate` / `run_segment`;
nothing here parses arguments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from tagclip_cli import __version__
from tagclip_cli.backbone import Backbone, load_backbone
from tagclip_cli.data import DecodeError, ImageItem, Preprocess, iter_records, load_rgb, to_device
from tagclip_cli.faults import OomSplitter
from tagclip_cli.formats import FileTags, TagsFile
from tagclip_cli.jobs import JobSpec, Placement, Summary, run_job, session
from tagclip_cli.segment import SegmentConfig, Segmenter, SegOutput, require_crf
from tagclip_cli.tagclip import TagCLIPConfig, Tagger
from tagclip_cli.vocab import Vocabulary
from tagclip_cli.writers import (
    COCO_JSON_FORMAT,
    label_png_path,
    mask_entries,
    segment_row,
    segment_schema,
    tag_row,
    tags_schema,
    write_label_png,
)

log = logging.getLogger(__name__)


@dataclass
class ModelOptions:
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    checkpoint: Path | None = None
    device: str = "cpu"
    cache_dir: Path | None = None
    model_explicit: bool = False
    precision: str = "fp32"  # fp32, or bf16 / fp16 autocast on CUDA

    def load(self) -> Backbone:
        return load_backbone(
            self.model,
            self.pretrained,
            self.checkpoint,
            device=self.device,
            cache_dir=self.cache_dir,
            model_explicit=self.model_explicit,
            precision=self.precision,
        )


@dataclass(kw_only=True)
class JobOptions:
    """What `annotate` and `segment` share: inputs, model, TagCLIP settings and the job settings."""

    items: Sequence[ImageItem]
    vocab: Vocabulary
    model: ModelOptions
    tagclip: TagCLIPConfig
    batch_size: int = 8
    workers: int = 2
    max_side: int | None = None
    part_size: int = 256
    overwrite: bool = False
    fail_fast: bool = False
    placement: Placement = field(default_factory=Placement)  # torchrun rank / --shard (jobs.py)


@dataclass(kw_only=True)
class AnnotateOptions(JobOptions):
    out: Path | None  # None: JSON Lines on stdout
    stdout: TextIO | None = None  # where --out - writes (default sys.stdout)


def run_config(backbone: Backbone, vocab: Vocabulary, cfg: TagCLIPConfig, max_side: int | None) -> dict:
    """Everything that determines the output; stored in the Parquet metadata and checked on resume."""
    return {
        "tool": "tagclip-cli",
        "tool_version": __version__,
        "model": backbone.identity(),
        "precision": backbone.precision,
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


# ---- segment --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class SegmentOptions(JobOptions):
    """`tagclip segment`: masks JSON at `out` (+ tags Parquet at tags_out, label PNGs in png_dir).

    tags_in: a tags Parquet whose tags are segmented instead of running TagCLIP in this pass."""

    out: Path
    segment: SegmentConfig
    tags_in: Path | None = None
    tags_out: Path | None = None
    png_dir: Path | None = None


def segment_records(
    segmenter: Segmenter, records: list[dict], tags_file: TagsFile | None = None, png_dir: Path | None = None
) -> list[dict]:
    """Segment rows (`segment_schema`) for a batch of decoded records; failed decodes, and images
    without usable tags in the tags file, become failed rows. Label PNGs are written as rows are made."""
    names = segmenter.vocab.classes
    from_file: dict[int, FileTags] = {}
    images: dict[int, np.ndarray] = {}  # RGB for the CRF
    failed: dict[int, str] = {}
    good = []
    for rec in records:
        index = rec["item"].index
        if rec["error"] is not None:
            continue
        if tags_file is not None:
            from_file[index] = tags_file.lookup(rec["item"])
            if from_file[index].error is not None:
                failed[index] = from_file[index].error
                continue
        if segmenter.config.crf:
            try:
                images[index] = crf_image(rec)
            except DecodeError as exc:
                failed[index] = f"cannot read the image again for the CRF ({exc})"
                continue
        good.append(rec)

    outputs: dict[int, SegOutput] = {}
    if good:
        tags = [from_file[r["item"].index].tags for r in good] if tags_file is not None else None
        results = segmenter.segment([r["pixels"] for r in good], [(r["height"], r["width"]) for r in good], tags,
                                    lambda i: images[good[i]["item"].index])
        outputs = {r["item"].index: out for r, out in zip(good, results, strict=True)}
    rows = []
    for rec in records:
        item = rec["item"]
        out = outputs.get(item.index)
        if out is None:
            error = rec["error"] if rec["error"] is not None else failed[item.index]
            rows.append(segment_row(item, rec["width"], rec["height"], error))
            continue
        if out.tag_output is not None:
            tag_names, scores = [names[t] for t in out.tag_output.tags], out.tag_output.scores.cpu()
        elif tags_file is not None:
            tag_names, scores = from_file[item.index].names, from_file[item.index].scores
        else:
            tag_names, scores = [], None
        if png_dir is not None:
            write_label_png(out.label_map, label_png_path(png_dir, item.image_id))
        masks = mask_entries(out.label_map, out.mask_scores)
        rows.append(segment_row(item, rec["width"], rec["height"], None, tag_names, scores, masks))
    return rows


def crf_image(record: dict) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of a decoded record, read again for the CRF (the record holds
    only the resized, normalised pixels). Raises DecodeError if it can no longer be read as before."""
    image = np.asarray(load_rgb(record["item"].path))
    if image.shape[:2] != (record["height"], record["width"]):
        raise DecodeError("the file changed while it was being processed")
    return image


def segment_config(
    backbone: Backbone, opts: SegmentOptions, tags_file: TagsFile | None
) -> dict:
    """run_config plus the segmentation settings and, with --tags, the tags file's identity."""
    config = run_config(backbone, opts.vocab, opts.tagclip, opts.max_side)
    config["segment"] = json.loads(json.dumps(asdict(opts.segment)))  # as config.json reads back (lists)
    if tags_file is not None:
        config["tagclip"] = None  # TagCLIP did not run here: the tags come from the file
        config["tags_input"] = tags_file.identity()
    return config


def run_segment(opts: SegmentOptions, progress: Callable[[int, int], object] | None = None) -> Summary:
    """Segment every item into opts.out (COCO RLE JSON; rows stream through OUT.parts/ like annotate,
    so the run resumes and shards), with the tags Parquet at opts.tags_out and label PNGs in
    opts.png_dir if asked. One model load; TagCLIP and CLS-SEG share each image's dense forward."""
    if opts.segment.crf:
        require_crf()
    tags_file = TagsFile(opts.tags_in, opts.vocab) if opts.tags_in is not None else None
    with session(opts.placement, opts.model.device) as sess:
        opts.model.device = sess.device
        backbone = opts.model.load()
        config = segment_config(backbone, opts, tags_file)
        segmenter = Segmenter(backbone, opts.vocab, opts.segment, opts.tagclip, run_tagclip=tags_file is None)
        preprocess = Preprocess(backbone.patch_size, backbone.mean, backbone.std, opts.max_side)
        final = {"tags_out": str(Path(opts.tags_out).resolve())} if opts.tags_out is not None else {}
        spec = JobSpec(
            items=opts.items, out=opts.out, config=config, schema=segment_schema(config), format=COCO_JSON_FORMAT,
            final_options=final, batch_size=opts.batch_size, part_size=opts.part_size, overwrite=opts.overwrite,
            fail_fast=opts.fail_fast,
        )
        pin = backbone.device.type == "cuda"
        downscaled = [0]

        def records(todo: Sequence[ImageItem]):
            for record in iter_records(todo, preprocess, opts.workers, pin_memory=pin):
                downscaled[0] += record["downscaled"]
                yield record

        process = OomSplitter(
            lambda batch: segment_records(segmenter, to_device(batch, backbone.device), tags_file, opts.png_dir)
        )
        share = sum(1 for it in opts.items if opts.placement.owns(it, spec.window))
        show = progress if progress and opts.placement.leader else None
        ctx = show(share) if show else nullcontext(None)
        with ctx as advance, torch.inference_mode():
            summary = run_job(spec, sess, records, process, progress=advance)
        log_downscaled(downscaled[0], opts.max_side)
        return summary
