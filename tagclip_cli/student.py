"""`tagclip train-student`: train a YOLO student on our pseudo-labels with Ultralytics (self-training).

MaskCLIP+ and CLIP-ES get their best masks by training an ordinary segmenter on the pseudo-masks of a
frozen CLIP; this module hands our tags and masks to an engine people already use instead of a trainer
of our own:

1. the tags and masks are checked to come from one run (the masks' recorded tags input, or the same
   model, vocabulary and TagCLIP settings for a one-pass `segment --tags-out`);
2. `tagclip_cli.export.export_yolo` writes the Ultralytics dataset (`OUT/dataset`: images linked,
   polygon or box labels, class names);
3. the images are split into train / val by a seeded hash of the image id (`is_val`): the split of
   an image does not depend on the other images, their order or the machine, so a grown collection
   keeps its old images where they were; `OUT/train.txt`, `OUT/val.txt` and `OUT/data.yaml` describe it;
4. Ultralytics trains the student (`--student`: a model yaml it ships, from scratch, or a `.pt` the
   user brought) into `OUT/student/` (weights/best.pt, results.csv), and `OUT/student.json`
   records the split, the settings and the final validation metrics.

`predict_label_pngs` writes a student's masks as the label PNGs (plus `categories.json`) that
`tagclip evaluate --masks DIR` reads, so the student is scored like the teacher.

Ultralytics is the optional extra `tagclip-cli[student]` and is imported only here. It is run
offline: `YOLO_OFFLINE=1` (no online checks, no telemetry: its events need to be online),
`YOLO_AUTOINSTALL=false` (no pip installs of missing requirements), `plots=False` (plots download a
font) and `amp` off unless asked (the AMP check downloads a reference model on CUDA).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagclip_cli import defaults
from tagclip_cli.errors import UsageError
from tagclip_cli.formats import MaskFile, read_tags_schema, tag_classes

INSTALL_HINT = ("train-student needs Ultralytics, which is not installed: "
                "pip install 'tagclip-cli[student]' (or pip install ultralytics)")
STUDENT_TASKS = ("detect", "segment")
# What train-student writes in --out; --overwrite replaces exactly these.
OUTPUTS = ("dataset", "train.txt", "val.txt", "data.yaml", "student", "student.json")
# Settings of the tags/masks run that the masks depend on: they must agree between the two files.
RUN_KEYS = ("model", "classes", "background", "tagclip")


@dataclass(frozen=True)
class StudentConfig:
    """One `tagclip train-student` run. `student` is an Ultralytics model yaml name or path (trained
    from scratch) or a `.pt` file (fine-tuned); `epochs`, `imgsz`, `batch`, `device` and `workers`
    go to `ultralytics.YOLO.train` as they are."""

    masks: Path
    out: Path
    tags: Path | None = None
    images: Path | None = None
    student: str = defaults.STUDENT_MODEL
    val_fraction: float = defaults.STUDENT_VAL_FRACTION
    seed: int = 0
    epochs: int = defaults.STUDENT_EPOCHS
    imgsz: int = defaults.STUDENT_IMGSZ
    batch: int = defaults.STUDENT_BATCH_SIZE
    device: str = defaults.DEVICE  # see ultralytics_device
    workers: int = defaults.STUDENT_WORKERS
    amp: bool = False
    copy: bool = False
    overwrite: bool = False


@dataclass
class StudentRun:
    """What a run produced: the dataset folder and its data.yaml, the split sizes, the Ultralytics
    run folder, the trained weights and the final validation metrics (Ultralytics' names)."""

    out: Path
    dataset: Path
    data_yaml: Path
    task: str
    train_images: int
    val_images: int
    run_dir: Path | None = None
    weights: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# ---- Ultralytics, offline --------------------------------------------------------------------------


def offline_ultralytics() -> Any:
    """Import Ultralytics with its network features off (see the module docstring); UsageError
    with the install line when it is not installed. The environment is set before the import
    because Ultralytics reads it once, at import time."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    from PIL import Image

    pil_open = Image.open
    try:
        import ultralytics
        import ultralytics.data.utils as data_utils
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    finally:
        # Ultralytics replaces PIL.Image.open for everyone on import (a HEIF fallback that imports
        # pi_heif on any unreadable file); our decoder's errors must stay ours, so put it back.
        Image.open = pil_open
    # Its dataset check fetches the plotting font (Arial.ttf) whatever `plots` says, and YOLO_OFFLINE
    # does not stop that request: the font it would fetch is only drawn on plots, which we turn off,
    # so the check finds a local copy or nothing and never goes online.
    data_utils.check_font = _local_font
    return ultralytics


def _local_font(font: str = "Arial.ttf") -> Path | None:
    """Ultralytics' font look-up without its download: the copy in its config folder, or None."""
    from ultralytics.utils import USER_CONFIG_DIR

    path = Path(USER_CONFIG_DIR) / Path(font).name
    return path if path.is_file() else None


def load_student(student: str) -> Any:
    """An `ultralytics.YOLO` from a model yaml (a name Ultralytics ships, e.g. yolo11n-seg.yaml, or a
    file) or a `.pt` file that exists: a `.pt` name that is not a file would be downloaded, which we
    never do. UsageError when it cannot be built or is not a detect / segment model."""
    ultralytics = offline_ultralytics()
    suffix = Path(student).suffix.lower()
    if suffix not in (".yaml", ".yml", ".pt"):
        raise UsageError(f"--student {student}: expected a model yaml (e.g. yolo11n-seg.yaml) or a .pt file")
    if suffix == ".pt" and not Path(student).is_file():
        raise UsageError(f"--student {student}: no such file (bring pretrained weights as a local .pt: "
                         "train-student never downloads them)")
    try:
        model = ultralytics.YOLO(student)
    except (FileNotFoundError, OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--student {student}: Ultralytics cannot load it ({first})") from None
    if model.task not in STUDENT_TASKS:
        raise UsageError(f"--student {student}: a '{model.task}' model; train-student trains "
                         f"{' or '.join(STUDENT_TASKS)} models")
    return model


# ---- inputs and split ------------------------------------------------------------------------------


def is_val(image_id: str, seed: int, val_fraction: float) -> bool:
    """Whether `image_id` is held out: the first 8 bytes of sha256(seed, id) as a number in [0, 1)
    below `val_fraction`. A pure function of (seed, id)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def check_same_run(masks: MaskFile, tags: Path) -> None:
    """UsageError unless the masks were made from `tags`: a masks file segmented with `--tags`
    records that file's sha256; a one-pass `segment --tags-out` writes both with the same settings."""
    from tagclip_cli.fileio import file_sha256

    tags_record = read_tags_schema(tags)
    tag_classes(tags, tags_record)  # FormatError when it is not one of our tags files
    record = masks.record
    if record.empty:
        raise UsageError(f"{masks.path}: no tagclip run metadata, so it cannot be checked against {tags} "
                         "(leave out --tags to train on the masks alone)")
    recorded = record.tags_input
    if isinstance(recorded, dict) and recorded.get("sha256"):
        if recorded["sha256"] != file_sha256(tags):
            raise UsageError(f"{masks.path}: segmented from another tags file (sha256 "
                             f"{str(recorded['sha256'])[:12]}...), not {tags}: tags and masks are from different runs")
        return
    for key in RUN_KEYS:
        if getattr(record, key) != getattr(tags_record, key):
            raise UsageError(f"{masks.path} and {tags}: different '{key}' in their run metadata: "
                             "tags and masks are from different runs")


def split_ids(masks: MaskFile, seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of the masks file's ok images (failed images are not exported), in file
    order. With val_fraction 0 nothing is held out."""
    train, val = [], []
    for im in masks:
        if im.status != "ok":
            continue
        (val if is_val(im.image_id, seed, val_fraction) else train).append(im.image_id)
    return train, val


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the parent folder {out.parent} does not exist")
    if out.is_dir():
        present = sorted(p.name for p in out.iterdir())
        if present and not overwrite:
            raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to replace a previous run)")
        foreign = [name for name in present if name not in OUTPUTS and not name.startswith(".dataset.")]
        if foreign:
            raise UsageError(f"--out {out}: holds '{foreign[0]}', which train-student did not write; "
                             "--overwrite only replaces a previous train-student run")


def _write_split(out: Path, dataset: Path, classes: Sequence[str], train: Iterable[str], val: Iterable[str]) -> Path:
    """train.txt / val.txt (absolute image paths, the list form Ultralytics reads) and data.yaml."""
    from tagclip_cli.export import yolo_name
    from tagclip_cli.fileio import write_bytes_atomic

    for name, ids in (("train", train), ("val", val)):
        # absolute but not resolved: the images are links, and Ultralytics finds a label by
        # replacing '/images/' in the path as written with '/labels/'
        lines = "".join(f"{os.path.abspath(dataset / 'images' / yolo_name(i))}\n" for i in ids)
        write_bytes_atomic(lines.encode(), out / f"{name}.txt")
    # JSON strings are YAML scalars: a class name with ':' or quotes stays one value
    names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in enumerate(classes))
    text = (f"# tagclip train-student: {dataset.name}/ split by a seeded hash of the image id\n"
            f"path: {json.dumps(str(out.resolve()))}\ntrain: train.txt\nval: val.txt\n"
            f"nc: {len(classes)}\nnames:\n{names}")
    write_bytes_atomic(text.encode(), out / "data.yaml")
    return out / "data.yaml"


# ---- the run ---------------------------------------------------------------------------------------


def train_student(config: StudentConfig) -> StudentRun:
    """Check, export, split and train (see the module docstring). Every check that can fail on the
    inputs (Ultralytics installed, the student loads, tags and masks from one run, every class
    mapped, both splits non-empty, --out free) runs before anything is written or trained."""
    from tagclip_cli.export import export_yolo

    _check_options(config)
    model = load_student(config.student)
    task = str(model.task)
    masks = MaskFile(config.masks)
    classes, train, val = _classes_and_splits(masks, config)
    _check_out(config.out, config.overwrite)
    out = config.out
    created = _clear_out(out)
    dataset = out / "dataset"
    try:  # the export checks the rest (every masked image in the tags file, image files found) first
        export_yolo(config.masks, dataset, tags=config.tags, images=config.images, task=task, copy=config.copy)
    except UsageError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    data_yaml = _write_split(out, dataset, classes, train, val)
    run = StudentRun(out=out, dataset=dataset, data_yaml=data_yaml, task=task, train_images=len(train),
                     val_images=len(val))

    model.train(data=str(data_yaml.resolve()), epochs=config.epochs, imgsz=config.imgsz, batch=config.batch,
                device=ultralytics_device(config.device), workers=config.workers, seed=config.seed, deterministic=True,
                project=str(out.resolve()), name="student", exist_ok=True, plots=False, amp=config.amp,
                val=True, verbose=False)
    trainer = model.trainer
    run.run_dir = Path(trainer.save_dir)
    run.weights = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    run.metrics = {str(k): float(v) for k, v in (trainer.metrics or {}).items()}
    _write_summary(run, config, task, classes)
    return run


def _check_options(config: StudentConfig) -> None:
    """The numeric options in range (one UsageError naming the option)."""
    if not 0.0 <= config.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), not {config.val_fraction}")
    for option, value in (("--epochs", config.epochs), ("--imgsz", config.imgsz), ("--batch", config.batch)):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, not {value}")
    if config.workers < 0:
        raise UsageError(f"--workers must be >= 0, not {config.workers}")


def _classes_and_splits(masks: MaskFile, config: StudentConfig) -> tuple[Sequence[str], list[str], list[str]]:
    """The class list (the tags file's, else the masks file's; every mask class in it) and the
    seeded train / val image ids, both non-empty (val is train with --val-fraction 0)."""
    if config.tags is not None:
        check_same_run(masks, config.tags)
    classes = tag_classes(config.tags, read_tags_schema(config.tags)) if config.tags is not None else masks.classes
    unknown = [name for name in masks.classes if name not in classes]
    if unknown:
        raise UsageError(f"{masks.path}: class '{unknown[0]}' is not in the vocabulary of {config.tags}: "
                         "the export cannot map it to a YOLO class id")
    if not classes:
        raise UsageError(f"{masks.path}: no classes to train on")
    train, val = split_ids(masks, config.seed, config.val_fraction)
    if not train:
        raise UsageError(f"{masks.path}: the training split is empty ({len(val)} images held out by "
                         f"--val-fraction {config.val_fraction}, no other images without a failure)")
    if not val:
        if config.val_fraction > 0:
            raise UsageError(f"{masks.path}: the validation split is empty ({len(train)} images, "
                             f"--val-fraction {config.val_fraction}): raise --val-fraction or label more images")
        val = train  # --val-fraction 0: Ultralytics still validates, on the training images
    return classes, train, val


def _clear_out(out: Path) -> bool:
    """Create `out` or remove a previous run's files from it; True if it was created."""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    for name in OUTPUTS:  # a previous run's files (only with --overwrite: _check_out)
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return created


def _write_summary(run: StudentRun, config: StudentConfig, task: str, classes: Sequence[str]) -> None:
    """`out/student.json`: the config, the split sizes, the run folder, the weights and metrics."""
    from tagclip_cli.fileio import write_bytes_atomic

    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
               "task": task, "classes": list(classes), "train_images": run.train_images,
               "val_images": run.val_images, "held_out": config.val_fraction > 0,
               "run_dir": str(run.run_dir), "weights": str(run.weights), "metrics": run.metrics}
    write_bytes_atomic((json.dumps(summary, indent=1) + "\n").encode(), run.out / "student.json")


# ---- the student's masks, for `tagclip evaluate` ---------------------------------------------------


def predict_label_pngs(weights: str | Path, images: str | Path, png_dir: str | Path, *,
                       imgsz: int = defaults.STUDENT_IMGSZ, device: str = defaults.DEVICE,
                       conf: float = defaults.STUDENT_CONF, ids: Sequence[str] | None = None) -> int:
    """Run a trained student on the images under `images` (or only the ids `ids`, relative to it)
    and write one label PNG per image in `png_dir` (pixel = class index + 1, 0 background; where
    instances overlap the more confident wins) plus `categories.json` with the class names:
    the layout `tagclip evaluate --masks png_dir` reads. Returns the number of images written."""
    from tagclip_cli.fileio import write_bytes_atomic
    from tagclip_cli.sources import IMAGE_EXTENSIONS
    from tagclip_cli.writers import label_png_path, write_label_png

    offline_ultralytics()
    weights, images, png_dir = Path(weights), Path(images), Path(png_dir)
    if not weights.is_file():
        raise UsageError(f"{weights}: no such weights file")
    if not images.is_dir():
        raise UsageError(f"{images}: not a directory")
    if ids is None:
        ids = sorted(p.relative_to(images).as_posix() for p in images.rglob("*")
                     if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not ids:
        raise UsageError(f"{images}: no images found")
    model = load_student(str(weights))
    names = [model.names[i] for i in sorted(model.names)]
    png_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for start in range(0, len(ids), 16):  # a few images at a time: results hold full-size masks
        chunk = list(ids[start:start + 16])
        results = model.predict([str(images / i) for i in chunk], imgsz=imgsz, device=ultralytics_device(device),
                                conf=conf, retina_masks=True, verbose=False)
        for image_id, result in zip(chunk, results, strict=True):
            write_label_png(student_label_map(result), label_png_path(png_dir, image_id))
            count += 1
    write_bytes_atomic(json.dumps({"categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]},
                                  indent=1).encode(), png_dir / "categories.json")
    return count


def student_label_map(result: Any) -> np.ndarray:
    """(H, W) uint16 label map of one Ultralytics result at the image's size: class index + 1 where
    an instance is, 0 elsewhere. Segment results paint their masks, detect results their boxes, in
    ascending confidence so the most confident instance ends on top."""
    height, width = result.orig_shape
    out = np.zeros((height, width), dtype=np.uint16)
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return out
    classes = boxes.cls.cpu().numpy().astype(np.int64)
    order = np.argsort(boxes.conf.cpu().numpy(), kind="stable")
    if result.masks is not None:
        masks = result.masks.data.cpu().numpy() > 0.5  # (N, H, W) at the image size (retina_masks)
        for i in order:
            out[masks[i]] = classes[i] + 1
    else:
        xyxy = boxes.xyxy.cpu().numpy()
        for i in order:
            x0, y0, x1, y1 = (int(round(v)) for v in xyxy[i])
            out[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = classes[i] + 1
    return out


def ultralytics_device(device: str) -> str:
    """Our --device in Ultralytics' terms: auto -> "0" with CUDA, else "cpu"; cuda -> "0"; cuda:N -> "N";
    anything else (cpu, "0", "0,1", mps) as it is."""
    if device == "auto":
        import torch

        return "0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "0"
    return device.removeprefix("cuda:")
