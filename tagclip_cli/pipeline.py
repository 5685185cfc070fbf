"""The annotate and segment pipelines: one runner, two stages.

    items -> decode (data.py: DecodedImage) -> mapper (TagCLIP, or CLS-SEG / MaskCLIP: typed results)
          -> writer (result rows; label PNGs) -> job (jobs/: parts, resume, shards, merge) -> output

`run_stage` does what both commands share (the process group and device, the model load,
preprocessing, decoding, out-of-memory retries, progress); a `Stage` says what one command
computes and writes. The CLI builds an `AnnotateOptions` / `SegmentOptions` and calls
`run_annotate` / `run_segment`; nothing here parses arguments.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

import numpy as np
import pyarrow as pa
import torch

from tagclip_cli import defaults
from tagclip_cli.backbone import Backbone, load_backbone
from tagclip_cli.data import DecodedImage, Preprocess, iter_records, to_device
from tagclip_cli.errors import FormatError, UsageError
from tagclip_cli.faults import OomSplitter
from tagclip_cli.formats import FileTags, TagsFile
from tagclip_cli.jobs.locks import output_lock
from tagclip_cli.jobs.parts import has_previous, previous_record
from tagclip_cli.jobs.placement import Placement
from tagclip_cli.jobs.runner import JobSpec, Summary, check_before_loading, run_job
from tagclip_cli.jobs.session import Session, session
from tagclip_cli.methods import Segments, SegOutput
from tagclip_cli.methods import get as get_method
from tagclip_cli.progress import task as progress_task
from tagclip_cli.quirks import Quirks
from tagclip_cli.record import RunRecord
from tagclip_cli.sources import ImageItem
from tagclip_cli.tagclip import TagCLIPConfig, Tagger
from tagclip_cli.thresholds import thresholds_record
from tagclip_cli.vocab import Vocabulary
from tagclip_cli.writers import (
    CAMS_FORMAT,
    COCO_JSON_FORMAT,
    MASKS_PARQUET_FORMAT,
    cam_file_path,
    label_png_path,
    mask_entries,
    segment_row,
    segment_schema,
    tag_row,
    tags_schema,
    write_cam_file,
    write_cams_index,
    write_label_png,
)

log = logging.getLogger(__name__)

Result = TypeVar("Result")
# progress(total) -> a context manager giving advance(n): the CLI's progress bar (cli._progress)
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], object]]]


@dataclass(frozen=True)
class ModelOptions:
    model: str = defaults.MODEL
    pretrained: str = defaults.PRETRAINED
    checkpoint: Path | None = None
    device: str = "cpu"  # as asked; the session may pin another (cuda:LOCAL_RANK under torchrun)
    cache_dir: Path | None = None
    model_explicit: bool = False
    precision: str = defaults.PRECISION  # fp32, or bf16 / fp16 autocast on CUDA

    def load(self, device: str | None = None) -> Backbone:
        """The backbone on `device` (the session's resolved device; default self.device)."""
        return load_backbone(
            self.model,
            self.pretrained,
            self.checkpoint,
            device=self.device if device is None else device,
            cache_dir=self.cache_dir,
            model_explicit=self.model_explicit,
            precision=self.precision,
        )

    def planned(self, previous: RunRecord | None) -> PlannedModel | None:
        """What the loaded backbone will record, known before loading; previous: the record of the
        output there (see `identity_before_loading`). None when only loading can tell."""
        from tagclip_cli.backbone.loading import identity_before_loading

        identity = identity_before_loading(self.model, self.pretrained, self.checkpoint, self.cache_dir,
                                           self.model_explicit, previous=previous.model if previous else None)
        return None if identity is None else PlannedModel(identity, self.precision)


@dataclass(frozen=True)
class PlannedModel:
    """The identity and precision a backbone will have (what `run_config` reads of it), before it loads."""

    known: dict
    precision: str

    def identity(self) -> dict:
        return dict(self.known)


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What `annotate` and `segment` share: inputs, output, model, TagCLIP settings and the job settings."""

    items: Sequence[ImageItem]
    vocab: Vocabulary
    out: Path | None  # None: JSON Lines on stdout (annotate only)
    model: ModelOptions
    tagclip: TagCLIPConfig
    quirks: Quirks = Quirks()  # Q1..Q4 (docs/algorithm.md §10), read by every method
    batch_size: int = defaults.BATCH_SIZE
    workers: int = defaults.WORKERS
    max_side: int | None = None  # no cap (the commands' default is defaults.MAX_SIDE)
    part_size: int = defaults.PART_SIZE
    overwrite: bool = False
    fail_fast: bool = False
    placement: Placement = field(default_factory=Placement)  # torchrun rank / --shard (jobs/)


@dataclass(frozen=True, kw_only=True)
class AnnotateOptions(JobOptions):
    stdout: TextIO | None = None  # where --out - writes (default sys.stdout)


def run_config(
    backbone: Backbone | PlannedModel, vocab: Vocabulary, cfg: TagCLIPConfig, max_side: int | None,
    quirks: Quirks = Quirks()
) -> RunRecord:
    """Everything that determines the output; stored in the Parquet metadata and checked on resume.
    backbone: the loaded one, or what it will be (PlannedModel: the rerun checks before it loads).

    Per-class thresholds (cfg.class_thresholds) are recorded as "thresholds" (`thresholds_record`),
    and only when set, so that a run without them has the metadata it always had."""
    tagclip = get_method("tagclip").record(cfg, quirks)
    class_thresholds = tagclip.pop("class_thresholds")
    return RunRecord(
        model=backbone.identity(),
        precision=backbone.precision,
        classes=list(vocab.classes),
        seg_names=list(vocab.seg_names),
        background=list(vocab.background) if cfg.use_background else [],
        vocabulary=vocab.source,
        tagclip=tagclip,
        max_side=max_side,
        thresholds=None if class_thresholds is None else
        thresholds_record(cfg.tag_threshold, class_thresholds, vocab.classes),
    )


# ---- the runner -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage(Generic[Result]):
    """What one command computes, once its model is loaded.

    config: everything that determines the output (stored with it, checked on resume); schema:
    the result rows; format / final_options: how the merged rows are written (jobs.write_final).
    mapper: a same-size batch of decoded images -> one typed result per image, in order (the model
    step, retried in halves on out-of-memory; a failed image must give a failed result without
    touching the model). writer: results -> output rows, writing any side files (label PNGs).
    needs_rgb: decoding keeps each image's RGB pixels for the mapper (the dense CRF). preprocess:
    the decoding's preprocessing when not the native-resolution one (PIAA's fixed crop)."""

    config: RunRecord
    schema: pa.Schema
    mapper: Callable[[list[DecodedImage]], list[Result]]
    writer: Callable[[list[Result]], list[dict]]
    format: str = "parquet"
    final_options: dict = field(default_factory=dict)
    needs_rgb: bool = False
    preprocess: Preprocess | None = None


def run_stage(
    opts: JobOptions,
    build: Callable[[Backbone, Session], Stage | Summary],
    progress: ProgressFactory | None = None,
    stdout: TextIO | None = None,
    output_format: str = "parquet",
    plan: Callable[[Backbone | PlannedModel], RunRecord] | None = None,
) -> Summary:
    """Run one command over opts.items: join the process group, lock this run's share of the
    output (jobs.output_lock), check the output against this run's record (plan, when the command
    can say it without the model) before anything loads, load the model on this rank's device, build
    the stage, then decode -> map -> write every window this rank owns (jobs.run_job: resume, shards,
    merge). Only the leader shows progress. build may return a Summary instead: there is nothing to
    map (yet)."""
    with session(opts.placement, opts.model.device) as sess, output_lock(sess, opts.out):
        # Locked before the model loads: a second run on a live run's output refuses at once; a
        # finished output is a no-op and one made with other settings a refusal, also before it.
        previous = plan is not None and has_previous(opts.out, opts.overwrite)
        planned = opts.model.planned(previous_record(opts.out)) if previous else None
        if planned is not None:
            done = check_before_loading(opts.out, plan(planned), opts.items, output_format, opts.placement)
            if done is not None:
                return done
        with progress_task(f"loading {opts.model.checkpoint or opts.model.model}"):
            backbone = opts.model.load(sess.device)
        stage = build(backbone, sess)
        if isinstance(stage, Summary):
            return stage
        spec = JobSpec(
            items=opts.items, out=opts.out, config=stage.config, schema=stage.schema, format=stage.format,
            final_options=stage.final_options, batch_size=opts.batch_size, part_size=opts.part_size,
            overwrite=opts.overwrite, fail_fast=opts.fail_fast,
        )
        preprocess = stage.preprocess or Preprocess(backbone.patch_size, backbone.mean, backbone.std, opts.max_side)
        downscaled = 0  # images the --max-side cap shrank (reported at the end)

        def decoded(todo: Sequence[ImageItem]) -> Iterator[DecodedImage]:
            nonlocal downscaled
            pin = backbone.device.type == "cuda"
            for image in iter_records(todo, preprocess, opts.workers, pin_memory=pin, keep_rgb=stage.needs_rgb):
                downscaled += image.downscaled
                yield image

        # On out-of-memory a batch is retried in halves, down to single images (faults.py).
        mapper = OomSplitter(lambda batch: stage.mapper(to_device(batch, backbone.device)))
        share = sum(1 for it in opts.items if opts.placement.owns(it, spec.window))
        show = progress if progress and opts.placement.leader else None
        with show(share) if show else nullcontext(None) as advance, torch.inference_mode():
            summary = run_job(spec, sess, decoded, lambda batch: stage.writer(mapper(batch)), progress=advance,
                              stdout=stdout)
        log_downscaled(downscaled, opts.max_side)
        return summary


def log_downscaled(count: int, max_side: int | None) -> None:
    """The note for images the --max-side cap shrank before the forward pass."""
    if count:
        log.info("%d image(s) longer than --max-side %d px were downscaled for the model (width/height in "
                 "the output are the original sizes; raise --max-side to keep more detail)", count, max_side)


# ---- annotate -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TagResult:
    """TagCLIP's answer for one image: the predicted tags (class names) and the fused score of
    every foreground class ((C,) float32 on the CPU, or a list read from a tags file), or the
    reason (error) it has none."""

    image: DecodedImage
    tags: list[str] = field(default_factory=list)
    scores: torch.Tensor | Sequence[float] | None = None
    error: str | None = None


def tag_images(tagger: Tagger, images: list[DecodedImage]) -> list[TagResult]:
    """The annotate mapper: TagCLIP on a same-size batch (failed decodes stay failed)."""
    good = [im for im in images if im.error is None]
    outputs = iter(tagger.tag([im.pixels for im in good])) if good else iter(())
    names = tagger.vocab.classes
    results = []
    for image in images:
        if image.error is not None:
            results.append(TagResult(image, error=image.error))
            continue
        out = next(outputs)
        results.append(TagResult(image, [names[t] for t in out.tags], out.scores.cpu()))
    return results


def tag_rows(results: list[TagResult]) -> list[dict]:
    """The annotate writer: one `tags_schema` row per result."""
    return [tag_row(r.image.item, r.image.width, r.image.height, r.error, r.tags, r.scores) for r in results]


def run_annotate(opts: AnnotateOptions, progress: ProgressFactory | None = None) -> Summary:
    """Tag every item into opts.out (Parquet) or stdout (JSON Lines), resuming an interrupted run of
    the same config; under torchrun / --shard only this rank's share (jobs/)."""

    def plan(model: Backbone | PlannedModel) -> RunRecord:
        return run_config(model, opts.vocab, opts.tagclip, opts.max_side, opts.quirks)

    def build(backbone: Backbone, sess: Session) -> Stage[TagResult]:
        config = plan(backbone)
        tagger = Tagger(backbone, opts.vocab, opts.tagclip, quirks=opts.quirks)
        return Stage(config=config, schema=tags_schema(config), mapper=lambda batch: tag_images(tagger, batch),
                     writer=tag_rows)

    return run_stage(opts, build, progress, stdout=opts.stdout, plan=plan)


# ---- segment --------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SegmentOptions(JobOptions):
    """`tagclip segment`: masks JSON at `out` (+ tags Parquet at tags_out, label PNGs in png_dir).

    method: a registered mask method's name (`methods.names("masks")`), segment its config
    (`methods.configure`). tags_in: a tags Parquet whose tags are segmented instead of running
    TagCLIP in this pass."""

    out: Path
    segment: Any
    method: str = "clses"
    tags_in: Path | None = None
    tags_out: Path | None = None
    png_dir: Path | None = None
    cams_dir: Path | None = None  # --save-cams DIR (segment.save_cams says the layout)


@dataclass(frozen=True)
class SegResult(TagResult):
    """One image's segmentation: the (H, W) int32 label map at the image size (0 = background,
    c + 1 = class c) with {label: score} of each label present, and the tags it was made from
    (TagCLIP's here, or the tags file's); or the reason (error) it has none."""

    label_map: np.ndarray | None = None
    mask_scores: dict[int, float] = field(default_factory=dict)
    saved_cams: np.ndarray | None = None  # --save-cams: float16 (K, H, W) or (K, gh, gw)
    cam_tags: tuple[int, ...] = ()  # the vocabulary index of each saved cam


def segment_images(
    segmenter: Segments, images: list[DecodedImage], tags_file: TagsFile | None = None
) -> list[SegResult]:
    """The segment mapper: the mask method on a same-size batch. Failed decodes, and images
    without usable tags in the tags file, become failed results. With the CRF each image needs its
    RGB pixels (decoded with keep_rgb). Writes nothing."""
    from_file: dict[int, FileTags] = {}
    failed: dict[int, str] = {}
    good: list[DecodedImage] = []
    for image in images:
        index = image.item.index
        if image.error is not None:
            failed[index] = image.error
            continue
        if tags_file is not None:
            from_file[index] = tags_file.lookup(image.item)
            if from_file[index].error is not None:
                failed[index] = from_file[index].error
                continue
        good.append(image)
    outputs: dict[int, SegOutput] = {}
    if good:
        tags = [from_file[im.item.index].tags for im in good] if tags_file is not None else None
        segs = segmenter.segment([im.pixels for im in good], [(im.height, im.width) for im in good], tags,
                                 lambda i: good[i].rgb)
        outputs = {im.item.index: out for im, out in zip(good, segs, strict=True)}
    names = segmenter.vocab.classes
    results = []
    for image in images:
        out = outputs.get(image.item.index)
        if out is None:
            results.append(SegResult(image, error=failed[image.item.index]))
        elif out.tag_output is not None:
            tags_here = [names[t] for t in out.tag_output.tags]
            results.append(SegResult(image, tags_here, out.tag_output.scores.cpu(), None, out.label_map,
                                     out.mask_scores, out.saved_cams, tuple(out.tags)))
        elif tags_file is None:  # a method without TagCLIP: the classes present are the tags
            results.append(SegResult(image, [names[t] for t in out.tags], None, None, out.label_map,
                                     out.mask_scores))
        else:
            entry = from_file.get(image.item.index, FileTags([], [], None))
            results.append(SegResult(image, entry.names, entry.scores, None, out.label_map, out.mask_scores,
                                     out.saved_cams, tuple(out.tags)))
    return results


def segment_rows(results: list[SegResult], png_dir: Path | None = None, cams_dir: Path | None = None) -> list[dict]:
    """The segment writer: one `segment_schema` row per result (masks as COCO RLE), the label PNG
    of each segmented image in png_dir and its cams (.npz) in cams_dir when given. Side files are
    written (atomically) before the rows reach the job's part file, so a resumed run that skips an
    image has its files already."""
    rows = []
    for r in results:
        item, width, height = r.image.item, r.image.width, r.image.height
        if r.error is not None:
            rows.append(segment_row(item, width, height, r.error))
            continue
        if png_dir is not None:
            write_label_png(r.label_map, label_png_path(png_dir, item.image_id))
        if cams_dir is not None and r.saved_cams is not None:
            write_cam_file(cam_file_path(cams_dir, item.image_id), r.saved_cams, r.cam_tags, (height, width),
                           item.image_id, os.path.abspath(item.path))
        rows.append(segment_row(item, width, height, None, r.tags, r.scores, mask_entries(r.label_map, r.mask_scores)))
    return rows


def segment_config(
    backbone: Backbone | PlannedModel, opts: SegmentOptions, tags_file: TagsFile | None
) -> RunRecord:
    """run_config plus the segmentation settings and, with --tags, the tags file's identity."""
    method = get_method(opts.method, "masks")
    config = run_config(backbone, opts.vocab, opts.tagclip, opts.max_side, opts.quirks)
    segment = json.loads(json.dumps(method.record(opts.segment, opts.quirks)))  # as config.json reads back
    ran_tagclip = method.needs_tags and tags_file is None  # methods without tags, or --tags: TagCLIP did not run
    return replace(config, segment=segment, tagclip=config.tagclip if ran_tagclip else None,
                   tags_input=tags_file.identity() if tags_file is not None else None)


def cams_index(config: RunRecord, seg: Any) -> dict:
    """DIR/cams.json of --save-cams: what every .npz in DIR means (format in writers.write_cam_file)
    and the label rule that made the run's masks from them (`cams.CamRule`)."""
    return {
        "format": CAMS_FORMAT,
        "version": 1,
        "layout": seg.save_cams,
        "dtype": "float16",
        "classes": config.classes,
        "vocabulary": config.vocabulary,
        "model": config.model,
        "rule": asdict(seg.rule),
    }


def open_tags_file(path: str | Path, vocab: Vocabulary) -> TagsFile:
    """The `--tags` file, its errors worded for the option that named it."""
    try:
        return TagsFile(path, vocab)
    except FormatError as exc:
        raise UsageError(f"--tags {exc}") from None


def masks_format(out: Path) -> str:
    """The masks output a segment run writes: a masks Parquet (`writers.masks_schema`, one row per
    mask, for large runs) when `out` ends in .parquet, else the COCO JSON (the default)."""
    return MASKS_PARQUET_FORMAT if Path(out).suffix.lower() == ".parquet" else COCO_JSON_FORMAT


def run_segment(opts: SegmentOptions, progress: ProgressFactory | None = None) -> Summary:
    """Segment every item into opts.out (COCO RLE JSON, or a masks Parquet: `masks_format`; rows
    stream through OUT.parts/ like annotate, so the run resumes and shards), with the tags Parquet
    at opts.tags_out and label PNGs in opts.png_dir if asked. One model load; TagCLIP and CLS-SEG
    share each image's dense forward."""
    method = get_method(opts.method, "masks")
    tags_file = open_tags_file(opts.tags_in, opts.vocab) if opts.tags_in is not None else None

    def plan(model: Backbone | PlannedModel) -> RunRecord:
        return segment_config(model, opts, tags_file)

    def build(backbone: Backbone, sess: Session) -> Stage[SegResult]:
        config = plan(backbone)
        segmenter = method.build(backbone, opts.vocab, opts.segment, quirks=opts.quirks, tagclip=opts.tagclip,
                                 run_tagclip=tags_file is None)
        final = {"tags_out": str(Path(opts.tags_out).resolve())} if opts.tags_out is not None else {}
        if opts.cams_dir is not None:
            write_cams_index(opts.cams_dir, cams_index(config, opts.segment), overwrite=opts.overwrite)
        return Stage(
            config=config, schema=segment_schema(config), format=masks_format(opts.out), final_options=final,
            mapper=lambda batch: segment_images(segmenter, batch, tags_file),
            writer=lambda results: segment_rows(results, opts.png_dir, opts.cams_dir),
            needs_rgb=segmenter.needs_rgb,
        )

    return run_stage(opts, build, progress, output_format=masks_format(opts.out), plan=plan)
