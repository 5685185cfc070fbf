"""The jobs behind `tagclip annotate`, `tagclip segment` and `tagclip merge`, as Python functions.

Each takes the command's options as keyword arguments, with the same names and defaults
(`tagclip_cli.defaults`), checks them, and runs the job: inputs, outputs, resume, shards and
torchrun exactly as the command does. The command only parses its options and calls its function,
so `tc.annotate("photos/", "coco", "tags.parquet")` and `tagclip annotate photos/ -v coco -o
tags.parquet` write the same file. Problems are raised as `TagclipError`s (a one-line message
that names the option or file, and the exit code the command uses).

Importing this module is cheap (no torch): the command line reads its defaults from here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tagclip_cli import defaults
from tagclip_cli.errors import TagclipError, UsageError, with_suggestion

if TYPE_CHECKING:
    from tagclip_cli.jobs.placement import Placement
    from tagclip_cli.jobs.runner import Summary
    from tagclip_cli.pipeline import ModelOptions, ProgressFactory
    from tagclip_cli.sources import ImageItem
    from tagclip_cli.vocab import Vocabulary

log = logging.getLogger(__name__)

PathLike = str | Path


# ---- the pieces every job shares ------------------------------------------------------------------

def model_options(model: str | None = None, pretrained: str = defaults.PRETRAINED, checkpoint: PathLike | None = None,
                  device: str = defaults.DEVICE, cache_dir: PathLike | None = None,
                  precision: str = defaults.PRECISION) -> ModelOptions:
    """What to load (pipeline.ModelOptions), checked before anything loads: the checkpoint file
    exists, the device is there (auto: cuda if available), the precision suits the device.
    model None: the paper's ViT-B-16, not named explicitly (see `load_backbone`)."""
    from tagclip_cli.backbone import check_precision
    from tagclip_cli.pipeline import ModelOptions

    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"{checkpoint}: checkpoint file not found")
    resolved = resolve_device(device)
    try:
        check_precision(precision, resolved)
    except TagclipError as exc:
        raise UsageError(f"--precision: {exc}") from None
    return ModelOptions(
        model=model or defaults.MODEL,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=resolved,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        model_explicit=model is not None,
        precision=precision,
    )


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; a CUDA device on a machine without CUDA is refused."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def vocabulary(spec, background: PathLike | Sequence[str] | None = None,
               no_background: bool = False) -> Vocabulary:
    """A vocabulary: a built-in name ("voc", "coco", "coco-stuff"), a vocabulary file, a list of
    class names (each a line of a vocabulary file: "person" or "person = person with clothes"),
    or a `Vocabulary` as it is. background: a file of background class names, or the
    names, replacing the vocabulary's own; no_background: none at all. Raises VocabularyError
    (a usage error naming the file and line)."""
    from tagclip_cli.vocab import Vocabulary, load_vocabulary, parse_vocabulary

    if isinstance(spec, Vocabulary):
        voc = spec
    elif isinstance(spec, str | Path):
        voc = load_vocabulary(spec)
    else:
        voc = parse_vocabulary("\n".join(spec), source="<list>")
    if no_background:
        return voc.with_background(())
    if isinstance(background, str | Path):
        return voc.with_background_file(background)
    if background is not None:
        return voc.with_background(tuple(background))
    return voc


def class_thresholds(path: PathLike | None, classes: Sequence[str], default: float) -> tuple[float, ...] | None:
    """The (F,) per-class thresholds of a --thresholds file (ThresholdFileError: exit 2, file and line)."""
    if path is None:
        return None
    from tagclip_cli.thresholds import read_threshold_file

    return read_threshold_file(Path(path), classes, default).vector(classes)


def collect_items(images: str | None, manifest: PathLike | None = None, image_root: PathLike | None = None,
                  images_parquet: str | None = None, image_column: str | None = None,
                  id_column: str | None = None, own: tuple | None = None) -> list[ImageItem]:
    """The input items (sources.py); manifest and image root stay strings so that URLs survive.
    own (rank, world): only the row groups / tar shards of that --shard task
    (sources.collect_items)."""
    from tagclip_cli.sources import ParquetColumns, is_url
    from tagclip_cli.sources import collect_items as collect

    def local(value):
        return Path(value) if value is not None and not is_url(str(value)) else value

    images = str(images) if isinstance(images, Path) else images
    return collect(images, local(manifest), local(image_root), images_parquet=images_parquet,
                   columns=ParquetColumns(image_column, id_column), own=own)


def planned_items(out: PathLike, placement: Placement, images: str | None, manifest: PathLike | None = None,
                  image_root: PathLike | None = None, images_parquet: str | None = None,
                  image_column: str | None = None, id_column: str | None = None,
                  batch_size: int | None = None, whole: bool = False) -> Sequence[ImageItem]:
    """The input items: for a --shard task or a torchrun rank other than 0, read from the plan the
    first task wrote beside the parts when it lists the same input (jobs/plan.py): only this
    placement's share of the windows of batch_size's run when it is given (not whole), else all of
    it; else listed (and marked with their input, so that the plan gets written). A --shard task
    (not under torchrun) without a plan lists only its own row groups of Parquet inputs, or its own
    tar shards (numbered locally, reading nothing of the others; jobs/listing.py), unless whole (a
    method that fits on the whole collection)."""
    from tagclip_cli.jobs.parts import parts_dir
    from tagclip_cli.jobs.plan import input_key, read_plan
    from tagclip_cli.jobs.runner import WINDOW_BATCHES

    window = None if batch_size is None or whole else batch_size * WINDOW_BATCHES
    key = None if images == "-" or str(out) == "-" else input_key(
        images=images, manifest=manifest, image_root=image_root, images_parquet=images_parquet,
        image_column=image_column, id_column=id_column)
    parts = None if key is None else parts_dir(Path(out))
    later = placement.shard is not None or not placement.leader
    if parts is not None and later and (parts / "items.parquet").is_file():  # (written before the plan)
        planned = read_plan(parts, key, placement, window)
        if planned is not None:
            held = "" if planned.held is None else f", {len(planned.held)} of them this task's"
            log.info("read the input list (%d images%s) from the plan in %s", len(planned), held, parts)
            return planned
    own = None
    if key is not None and placement.shard is not None and not placement.distributed and not whole:
        own = (placement.rank, placement.world)
    items = collect_items(images, manifest, image_root, images_parquet, image_column, id_column, own)
    if key is not None and hasattr(items, "input_key"):
        items.input_key = key
    return items


def job_placement(shard: str | None, out: str, overwrite: bool, images: str | None) -> Placement:
    """Where this process sits (torchrun env, --shard I/N); refuses combinations that cannot work."""
    from tagclip_cli.jobs.placement import parse_shard, placement_from_env

    placement = placement_from_env(parse_shard(shard) if shard else None)
    if placement.shard and overwrite:
        raise UsageError("--overwrite cannot be combined with --shard (one shard would delete the others' results); "
                         "remove OUT and OUT.parts yourself to start over")
    if placement.distributed and out == "-":
        raise UsageError("--out - (JSON Lines on stdout) works in a single process; with torchrun write Parquet")
    if placement.distributed and images == "-":
        raise UsageError("'-' (paths on stdin) cannot be shared by torchrun ranks; write the list to a file")
    return placement


# ---- the jobs -------------------------------------------------------------------------------------

def annotate(
    images: PathLike | None, vocab, out: PathLike, *,
    manifest: PathLike | None = None, image_root: PathLike | None = None, images_parquet: str | None = None,
    image_column: str | None = None, id_column: str | None = None, shard: str | None = None,
    model: str | None = None, pretrained: str = defaults.PRETRAINED, checkpoint: PathLike | None = None,
    device: str = defaults.DEVICE, precision: str = defaults.PRECISION,
    background: PathLike | None = None, no_background: bool = False,
    tag_threshold: float = defaults.TAG_THRESHOLD, thresholds: PathLike | None = None, reference_compat: bool = False,
    batch_size: int = defaults.BATCH_SIZE, workers: int = defaults.WORKERS, max_side: int = defaults.MAX_SIDE,
    overwrite: bool = False, fail_fast: bool = False, part_size: int = defaults.PART_SIZE,
    cache_dir: PathLike | None = None, progress: ProgressFactory | None = None, stdout: TextIO | None = None,
    method: str = defaults.TAG_METHOD, dense: str | None = None, setting: str | None = None,
    bank_size: int | None = None, piaa_model: PathLike | None = None, fit_on: PathLike | None = None,
) -> Summary:
    """`tagclip annotate`: tag every image with TagCLIP (method="piaa": PIAA) into `out`, a tags
    Parquet (one row per image: every class's score, the tags), or "-" for JSON Lines on `stdout`
    (default sys.stdout). images: a folder, a path list, one image, tar shards, ... as the
    command's IMAGES (None with manifest= or images_parquet=); vocab: anything `vocabulary` takes.
    PIAA (docs/methods.md): dense (sclip, clearclip, naclip), setting (its constants: voc, coco,
    nus), bank_size (patches per class), piaa_model (score with a model fitted elsewhere), fit_on
    (fit on another collection, an input as IMAGES); its fit is written beside `out`.
    An interrupted run of the same settings resumes; under torchrun / with shard="I/N" only this
    process's share. Returns the job's Summary (done, skipped, failed, failures)."""
    from tagclip_cli.fileio import check_output_path, check_output_suffix
    from tagclip_cli.pipeline import AnnotateOptions, run_annotate
    from tagclip_cli.quirks import Quirks
    from tagclip_cli.tagclip import TagCLIPConfig

    piaa_options = {"dense": dense, "setting": setting, "bank_size": bank_size, "piaa_model": piaa_model,
                    "fit_on": fit_on}
    check_tag_method(method, piaa_options, background)
    if str(out) != "-":
        check_output_suffix(out, (".parquet",), others=", or '-' for JSON Lines on stdout")
    placement = job_placement(shard, str(out), overwrite, images)
    voc = vocabulary(vocab, background, no_background)
    items = planned_items(out, placement, images, manifest, image_root, images_parquet, image_column, id_column,
                          batch_size, whole=method == "piaa")  # PIAA fits on the whole collection
    cfg = TagCLIPConfig(tag_threshold=tag_threshold, use_background=not no_background,
                        class_thresholds=class_thresholds(thresholds, voc.classes, tag_threshold))
    model_opts = model_options(model, pretrained, checkpoint, device, cache_dir, precision)
    out_path = None if str(out) == "-" else Path(out)
    if out_path is not None:
        check_output_path(out_path)  # before the model loads: a bad --out fails in a second
    opts = AnnotateOptions(
        items=items, vocab=voc, out=out_path, stdout=stdout, model=model_opts, tagclip=cfg,
        quirks=Quirks(reference_compat), batch_size=batch_size,
        workers=workers, max_side=max_side, overwrite=overwrite, fail_fast=fail_fast, placement=placement,
        part_size=part_size,
    )
    if method == "piaa":
        from tagclip_cli.piaajob import run_annotate_piaa

        return run_annotate_piaa(opts, piaa_job_options(cfg, **piaa_options), progress=progress)
    return run_annotate(opts, progress=progress)


def check_tag_method(method: str, piaa_options: dict, background: PathLike | None) -> None:
    """annotate's --method and the PIAA options: the combinations refused before anything loads."""
    from tagclip_cli import methods

    if method not in methods.names("tags"):
        raise UsageError(f"--method must be one of {', '.join(methods.names('tags'))}, not '{method}'")
    given = [name for name, value in piaa_options.items() if value is not None]
    if method != "piaa" and given:
        raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in given)}: PIAA options; add --method piaa")
    if method == "piaa" and background is not None:
        raise UsageError("--background: PIAA scores the vocabulary's classes only (it has no background classes)")
    if piaa_options["piaa_model"] is not None and piaa_options["fit_on"] is not None:
        raise UsageError("--piaa-model scores with a model fitted elsewhere; --fit-on fits one here: give one of them")
    if piaa_options["piaa_model"] is not None and not Path(piaa_options["piaa_model"]).is_file():
        raise UsageError(f"--piaa-model {piaa_options['piaa_model']}: file not found")
    if piaa_options["bank_size"] is not None and piaa_options["bank_size"] < 2:
        raise UsageError(f"--bank-size {piaa_options['bank_size']}: keep at least 2 patches per class")


def piaa_job_options(tagclip, dense: str | None, setting: str | None, bank_size: int | None,
                     piaa_model: PathLike | None, fit_on: PathLike | None):
    """PIAA's options of an annotate run (piaajob.PiaaOptions): the published constants of the
    setting, the tag thresholds of tagclip (TagCLIPConfig: --tag-threshold, --thresholds), the
    items of --fit-on."""
    from tagclip_cli.piaajob import PiaaOptions, fitted_config

    setting = setting or defaults.PIAA_SETTING
    config = fitted_config(setting, dense or defaults.PIAA_DENSE, bank_size or defaults.PIAA_BANK_SIZE,
                           tagclip.tag_threshold, tagclip.class_thresholds)
    fit_items = collect_items(str(fit_on)) if fit_on is not None else None
    return PiaaOptions(config, setting, Path(piaa_model) if piaa_model is not None else None, fit_items,
                       str(fit_on) if fit_on is not None else None)


def segment(
    images: PathLike | None, vocab, out: PathLike, *,
    tags_in: PathLike | None = None, tags_out: PathLike | None = None, png_dir: PathLike | None = None,
    method: str = defaults.SEGMENT_METHOD, crf: bool = False, setting: str = defaults.SEGMENT_SETTING,
    save_cams: PathLike | None = None, cams_grid: bool = False, rcs: bool = False, key_smoothing: bool = False,
    prompt_denoising: bool = False,
    manifest: PathLike | None = None, image_root: PathLike | None = None, images_parquet: str | None = None,
    image_column: str | None = None, id_column: str | None = None, shard: str | None = None,
    model: str | None = None, pretrained: str = defaults.PRETRAINED, checkpoint: PathLike | None = None,
    device: str = defaults.DEVICE, precision: str = defaults.PRECISION,
    background: PathLike | None = None, no_background: bool = False,
    tag_threshold: float | None = None, thresholds: PathLike | None = None, reference_compat: bool = False,
    batch_size: int = defaults.BATCH_SIZE, workers: int = defaults.WORKERS, max_side: int = defaults.MAX_SIDE,
    overwrite: bool = False, fail_fast: bool = False, part_size: int = defaults.PART_SIZE,
    cache_dir: PathLike | None = None, progress: ProgressFactory | None = None,
) -> Summary:
    """`tagclip segment`: masks of every image into `out`, a COCO RLE JSON (or a masks Parquet when
    it ends in .parquet), optionally with label PNGs (png_dir), the tags Parquet (tags_out) and the
    refined CAMs (save_cams). tags_in: segment the tags of an earlier annotate run instead of
    running TagCLIP. tag_threshold None: 0.5, or 0.1 with setting="cocostuff". Resumes and shards
    like `annotate`; returns the job's Summary."""
    from tagclip_cli.fileio import check_output_path, check_output_suffix
    from tagclip_cli.pipeline import SegmentOptions, run_segment
    from tagclip_cli.quirks import Quirks

    check_output_suffix(out, (".json", ".parquet"))
    if tags_out is not None:
        check_output_suffix(tags_out, (".parquet",), "--tags-out")

    paths = {name: Path(value) if value is not None else None for name, value in
             (("out", out), ("tags_in", tags_in), ("tags_out", tags_out), ("png_dir", png_dir),
              ("save_cams", save_cams))}
    check_segment_options(method, setting, crf, paths, cams_grid, key_smoothing, prompt_denoising, thresholds)
    placement = job_placement(shard, str(out), overwrite, images)
    if crf:
        from tagclip_cli.cams import require_crf

        require_crf()  # the one check on this path: before anything loads
    for path in (paths["out"], paths["tags_out"]):
        if path is not None:
            check_output_path(path)
    if paths["png_dir"] is not None and paths["png_dir"].exists() and not paths["png_dir"].is_dir():
        raise UsageError(f"--png-dir {png_dir}: exists and is not a directory")
    seg_cfg = segment_config(setting, method, crf, key_smoothing, prompt_denoising,
                             None if save_cams is None else ("grid" if cams_grid else "image"), rcs)
    voc = vocabulary(vocab, background, no_background)
    items = planned_items(out, placement, images, manifest, image_root, images_parquet, image_column, id_column,
                          batch_size)
    cfg = tagclip_config(setting, tag_threshold, no_background, thresholds, voc.classes)
    opts = SegmentOptions(
        items=items, vocab=voc, out=paths["out"], model=model_options(model, pretrained, checkpoint, device, cache_dir,
                                                                      precision),
        tagclip=cfg, segment=seg_cfg, method=method, quirks=Quirks(reference_compat), tags_in=paths["tags_in"],
        tags_out=paths["tags_out"], png_dir=paths["png_dir"], cams_dir=paths["save_cams"], batch_size=batch_size,
        workers=workers, max_side=max_side, part_size=part_size, overwrite=overwrite, fail_fast=fail_fast,
        placement=placement,
    )
    return run_segment(opts, progress=progress)


def check_segment_options(method: str, setting: str, crf: bool, paths: dict[str, Path | None], cams_grid: bool,
                          key_smoothing: bool, prompt_denoising: bool, thresholds: PathLike | None) -> None:
    """The combinations `segment` refuses, from the registry's facts of the method (tagclip_cli.methods),
    before anything loads (UsageError naming the options)."""
    from tagclip_cli import methods

    if method not in methods.names("masks"):
        raise UsageError(with_suggestion(f"--method must be one of {', '.join(methods.names('masks'))}, not "
                                         f"'{method}'", method, methods.names("masks")))
    if setting not in methods.SETTINGS:
        raise UsageError(with_suggestion(f"--setting must be one of {', '.join(methods.SETTINGS)}, not '{setting}'",
                                         setting, methods.SETTINGS))
    spec = methods.get(method, "masks")
    _check_save_cams(paths["save_cams"], cams_grid, method, "save_cams" in spec.options)
    if crf and "crf" not in spec.options:
        raise UsageError(f"--crf refines CLS-SEG cams; it does not apply to --method {method}")
    if (key_smoothing or prompt_denoising) and not {"key_smoothing", "prompt_denoising"} <= spec.options:
        raise UsageError("--key-smoothing and --prompt-denoising are MaskCLIP options (--method maskclip)")
    tags_in, tags_out = paths["tags_in"], paths["tags_out"]
    if not spec.needs_tags and (tags_in is not None or tags_out is not None):
        raise UsageError(f"--tags and --tags-out are for TagCLIP's tags; --method {method} does not use them")
    if tags_in is not None and tags_out is not None:
        raise UsageError("--tags-out writes the tags of TagCLIP run here; with --tags the tags are already in that "
                         "file")
    if thresholds is not None and tags_in is not None:
        raise UsageError("--thresholds applies to the TagCLIP tags computed here; with --tags, re-derive that file's "
                         "tags first: tagclip retag TAGS --thresholds FILE --out NEW")
    if str(paths["out"]) == "-":
        raise UsageError("segment writes a COCO JSON or masks Parquet file; --out - is not supported "
                         "(use annotate for JSON Lines)")


def _check_save_cams(save_cams: Path | None, cams_grid: bool, method: str, saves_cams: bool) -> None:
    """--save-cams DIR / --cams-grid: usage errors before anything loads."""
    if cams_grid and save_cams is None:
        raise UsageError("--cams-grid chooses the layout of --save-cams DIR; give --save-cams too")
    if save_cams is None:
        return
    if not saves_cams:
        raise UsageError("--save-cams saves CLS-SEG's refined CAMs; it needs --method clses")
    if save_cams.exists() and not save_cams.is_dir():
        raise UsageError(f"--save-cams {save_cams}: exists and is not a directory")


def segment_config(setting: str = defaults.SEGMENT_SETTING, method: str = defaults.SEGMENT_METHOD,
                   crf: bool = False, key_smoothing: bool = False, prompt_denoising: bool = False,
                   save_cams: str | None = None, rcs: bool = False):
    """The mask method's frozen config from `segment`'s flat options (the registry's `configure`)."""
    from tagclip_cli import methods

    return methods.configure(method, setting, crf=crf, key_smoothing=key_smoothing,
                             prompt_denoising=prompt_denoising, save_cams=save_cams, rcs=rcs)


def tagclip_config(setting: str = defaults.SEGMENT_SETTING, tag_threshold: float | None = None,
                   no_background: bool = False, thresholds: PathLike | None = None, classes: Sequence[str] = ()):
    """TagCLIP's settings for `segment`: the paper's, or TagCLIP's COCO-Stuff values (layers 1..L-1,
    thresholds 0.1, no background) with setting="cocostuff"; tag_threshold None keeps the setting's."""
    from tagclip_cli.tagclip import TagCLIPConfig

    tag_kw: dict = {}
    if tag_threshold is not None:
        tag_kw["tag_threshold"] = tag_threshold
    if setting == "cocostuff":
        cfg = TagCLIPConfig.coco_stuff(**tag_kw)
    else:
        cfg = TagCLIPConfig(use_background=not no_background, **tag_kw)
    if thresholds is not None:
        cfg = dataclasses.replace(cfg, class_thresholds=class_thresholds(thresholds, classes, cfg.tag_threshold))
    return cfg


def merge(out: PathLike) -> int:
    """`tagclip merge`: merge the parts of separately run shards (shard="I/N") into `out`, once
    every image has a result; returns the number of rows written."""
    from tagclip_cli.jobs.parts import merge_output

    return merge_output(Path(out))
