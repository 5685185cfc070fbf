"""`annotate --method piaa` (docs/algorithm.md §13, docs/scaleout.md): PIAA's fit pass over a
collection (jobs.fit: each part's `PatchBank`, resumed after a kill, the banks merged exactly), the
fitted model beside the output (OUT.piaa.safetensors) or `--piaa-model FILE` fitted elsewhere,
then the scoring stage: the tags Parquet with PIAA's final score of every class and its tags."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tagclip_cli import methods
from tagclip_cli.backbone import Backbone
from tagclip_cli.data import DecodedImage, Preprocess, iter_records
from tagclip_cli.errors import FormatError, UsageError
from tagclip_cli.fileio import file_sha256
from tagclip_cli.jobs.fit import FitSpec, inputs_identity, read_model, run_fit
from tagclip_cli.jobs.runner import WINDOW_BATCHES, Summary
from tagclip_cli.jobs.session import Session
from tagclip_cli.methods.piaa import PIAA_DENSE
from tagclip_cli.piaa import PatchBank, Piaa, PiaaConfig, PiaaModel, crop_pixels
from tagclip_cli.pipeline import AnnotateOptions, ProgressFactory, Stage, TagResult, run_stage, tag_rows
from tagclip_cli.record import RunRecord
from tagclip_cli.sources import ImageItem
from tagclip_cli.thresholds import thresholds_record
from tagclip_cli.writers import tags_schema

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".piaa.safetensors"  # the fitted model, beside the output
WORK_SUFFIX = ".piaa.parts"  # the fit's part states while it runs


@dataclass(frozen=True)
class PiaaOptions:
    """PIAA's part of an annotate run: its config (`PiaaConfig.published(setting)` with the run's
    bank size and tag thresholds), the setting, a model file fitted elsewhere (--piaa-model), or
    the items to fit on (--fit-on; None: the images being tagged) and how they were named."""

    config: PiaaConfig
    setting: str = "voc"
    model_file: Path | None = None
    fit_items: Sequence[ImageItem] | None = None
    fit_source: str | None = None


def model_path(out: Path) -> Path:
    return out.with_name(out.name + MODEL_SUFFIX)


def work_path(out: Path) -> Path:
    return out.with_name(out.name + WORK_SUFFIX)


@dataclass(frozen=True)
class CropPreprocess(Preprocess):
    """PIAA's input, fit and score alike: `crop_pixels` of the decoded image, (3, size, size)."""

    size: int = 224

    def downscaled(self, width: int, height: int) -> bool:
        return False

    def __call__(self, image) -> Tensor:
        return crop_pixels(np.asarray(image), self.size, self.mean, self.std)


class BankFitter:
    """PIAA's `jobs.fit.Fitter`: a `PatchBank` filled with the patches of the crops."""

    def __init__(self, runner: Piaa) -> None:
        self.runner = runner
        self.bank = runner.new_bank()

    def offer(self, images: list[DecodedImage]) -> None:
        crops = torch.stack([im.pixels for im in images])
        self.runner.offer(self.bank, crops, torch.tensor([im.item.index for im in images]))

    def state(self) -> dict[str, Tensor]:
        return self.bank.state()

    def restore(self, state: dict[str, Tensor]) -> None:
        self.bank = PatchBank.from_state(state)

    def merge(self, state: dict[str, Tensor]) -> None:
        self.bank.merge(PatchBank.from_state(state))

    def fit(self) -> dict[str, Tensor]:
        return self.runner.fit(self.bank).state()


def fit_identity(backbone: Backbone, runner: Piaa) -> dict:
    """What determines a PIAA fit but its inputs (jobs.fit adds them): model, prompts and the
    fit's constants."""
    cfg = runner.config
    return {"method": "piaa", "model": backbone.identity(), "precision": backbone.precision,
            "classes": list(runner.vocab.classes), "prompts": list(runner.prompts), "dense": cfg.dense,
            "text_scale": cfg.text_scale, "bank_size": cfg.bank_size, "refine_temperature": cfg.refine_temperature,
            "entropy_floor": cfg.entropy_floor, "input_size": cfg.input_size,
            "keep_singleton_groups": cfg.keep_singleton_groups}


def check_model_file(path: Path, wanted: dict) -> tuple[PiaaModel, dict]:
    """A --piaa-model file fitted elsewhere, checked against this run's fit identity (wanted):
    the same model, vocabulary, prompts and dense variant; UsageError in one line otherwise."""
    try:
        tensors, identity = read_model(path)
    except FileNotFoundError:
        raise UsageError(f"--piaa-model {path}: file not found") from None
    except FormatError as exc:
        raise UsageError(f"--piaa-model {exc}") from None
    if identity.get("method") != "piaa" or not {"weight", "bias"} <= set(tensors):
        raise UsageError(f"--piaa-model {path}: not a fitted PIAA model (method {identity.get('method')!r})")
    if identity.get("model") != wanted["model"]:
        raise UsageError(f"--piaa-model {path}: fitted with another model ({identity.get('model')}); this run uses "
                         f"{wanted['model']}")
    if identity.get("classes") != wanted["classes"] or identity.get("prompts") != wanted["prompts"]:
        theirs = identity.get("classes") or []
        raise UsageError(f"--piaa-model {path}: fitted for another vocabulary ({len(theirs)} classes: "
                         f"{_first(theirs)}); this run has {len(wanted['classes'])}: {_first(wanted['classes'])}")
    if identity.get("dense") != wanted["dense"]:
        raise UsageError(f"--piaa-model {path}: fitted on --dense {identity.get('dense')} patch features; this run "
                         f"uses --dense {wanted['dense']}")
    return PiaaModel.from_state(tensors), identity


def _first(names: Sequence[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def piaa_record(backbone: Backbone, opts: AnnotateOptions, piaa: PiaaOptions, fit: dict) -> RunRecord:
    """The run record of a PIAA annotate run: no TagCLIP, no background; "tagger" holds PIAA's
    settings and the fit (model file, sha256, the inputs it was fitted on)."""
    cfg = piaa.config
    tagger = {**methods.get("piaa", "tags").record(cfg, opts.quirks), "setting": piaa.setting, "fit": fit}
    return RunRecord(
        model=backbone.identity(), precision=backbone.precision, classes=list(opts.vocab.classes),
        seg_names=list(opts.vocab.seg_names), background=[], vocabulary=opts.vocab.source, tagclip=None,
        thresholds=None if cfg.class_thresholds is None else
        thresholds_record(cfg.tag_threshold, cfg.class_thresholds, opts.vocab.classes),
        tagger=tagger,
    )


def score_images(runner: Piaa, model: PiaaModel, images: list[DecodedImage]) -> list[TagResult]:
    """The mapper: PIAA's final scores and tags of a batch of crops (failed decodes stay failed)."""
    good = [im for im in images if im.error is None]
    scores = runner.score(torch.stack([im.pixels for im in good]), model) if good else torch.zeros(0)
    tags = iter(runner.tags(scores)) if good else iter(())
    rows = iter(scores)
    names = runner.vocab.classes
    return [TagResult(im, error=im.error) if im.error is not None else
            TagResult(im, [names[t] for t in next(tags)], next(rows)) for im in images]


# ---- the run --------------------------------------------------------------------------------------

def run_annotate_piaa(opts: AnnotateOptions, piaa: PiaaOptions, progress: ProgressFactory | None = None) -> Summary:
    """`annotate --method piaa`: in one locked session, the fit (or the --piaa-model file), then
    the scoring stage over opts.items (resume, shards, merge as any annotate run)."""
    if opts.out is None and piaa.model_file is None:
        raise UsageError("--method piaa writes its fitted model beside --out; with --out - give --piaa-model FILE")

    def build(backbone: Backbone, sess: Session) -> Stage[TagResult] | Summary:
        runner = methods.get("piaa", "tags").build(backbone, opts.vocab, piaa.config, quirks=opts.quirks)
        crop = CropPreprocess(backbone.patch_size, backbone.mean, backbone.std, size=piaa.config.input_size)
        wanted = fit_identity(backbone, runner)
        if piaa.model_file is not None:
            model, identity = check_model_file(piaa.model_file, wanted)
            fit = fit_record(piaa.model_file.resolve(), identity)
        else:
            fitted = _fit(opts, piaa, sess, runner, crop, wanted, progress)
            if isinstance(fitted, Summary):
                return fitted
            model, fit = fitted
        config = piaa_record(backbone, opts, piaa, fit)
        return Stage(config=config, schema=tags_schema(config), mapper=lambda batch: score_images(runner, model, batch),
                     writer=tag_rows, preprocess=crop)

    return run_stage(opts, build, progress, stdout=opts.stdout)


def fit_record(path: Path, identity: dict, name: str | None = None) -> dict:
    """The record's "fit": the model file (its name beside the output, else its path), its sha256
    and the inputs it was fitted on."""
    return {"file": name or str(path), "sha256": file_sha256(path), "inputs": identity.get("inputs")}


def _fit(opts: AnnotateOptions, piaa: PiaaOptions, sess: Session, runner: Piaa, crop: CropPreprocess,
         wanted: dict, progress: ProgressFactory | None) -> tuple[PiaaModel, dict] | Summary:
    """The fit pass over the fit items (jobs.fit): the model and its record, or a Summary with the
    note of a --shard whose fellow shards still fit."""
    out = Path(opts.out)
    items = piaa.fit_items if piaa.fit_items is not None else opts.items
    spec = FitSpec(items=items, work=work_path(out), model=model_path(out), identity=wanted,
                   batch_size=opts.batch_size, window=opts.batch_size * WINDOW_BATCHES, checkpoint=opts.part_size,
                   overwrite=opts.overwrite)
    pin = runner.backbone.device.type == "cuda"

    def records(todo: Sequence[ImageItem]) -> Iterator[DecodedImage]:
        return iter_records(todo, crop, opts.workers, pin_memory=pin)

    share = sum(1 for it in items if sess.placement.owns(it, spec.window))
    fitting = opts.overwrite or not spec.model.exists()
    if fitting:
        log.info("PIAA: fitting on %d images (%s; %d patches per class), then tagging", len(items),
                 sess.placement.describe(), piaa.config.bank_size)
    show = progress if progress and sess.placement.leader and fitting else None
    with show(share) if show else nullcontext(None) as advance, torch.inference_mode():
        outcome = run_fit(spec, sess, records, BankFitter(runner), advance)
    if outcome.model is None:
        return Summary(total=0, leader=sess.placement.leader, note=outcome.note)
    identity = {**wanted, "inputs": inputs_identity(items)}
    fit = fit_record(spec.model, identity, name=spec.model.name)
    if piaa.fit_source is not None:
        fit["fit_on"] = piaa.fit_source
    return PiaaModel.from_state(outcome.model), fit


def fitted_config(setting: str, dense: str, bank_size: int, tag_threshold: float,
                  class_thresholds: tuple[float, ...] | None) -> PiaaConfig:
    """PIAA's config of an annotate run: the published constants of setting, with the options."""
    if dense not in PIAA_DENSE:
        raise UsageError(f"--dense must be one of {', '.join(PIAA_DENSE)}, not '{dense}'")
    config = methods.get("piaa", "tags").config(setting)
    return replace(config, dense=dense, bank_size=bank_size, tag_threshold=tag_threshold,
                   class_thresholds=class_thresholds)
