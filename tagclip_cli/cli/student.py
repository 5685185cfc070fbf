"""The student commands: train-student (a YOLO model on our masks) and student-predict (its label PNGs)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tagclip_cli.cli.common import QUIET_OPT, VERBOSE_OPT, err_console, setup_logging

MASKS_OPT = typer.Option(..., "--masks", help="Masks of `tagclip segment` (COCO JSON or masks Parquet).")
TAGS_OPT = typer.Option(None, "--tags", help="Tags Parquet of the same run: checked against the masks and its "
                        "vocabulary names the classes.")
IMAGES_OPT = typer.Option(None, "--images", help="Folder the image ids are relative to (default: the paths "
                          "recorded in the tags file).")
OUT_OPT = typer.Option(..., "--out", "-o", help="Run folder: dataset/, train.txt, val.txt, data.yaml, student/ "
                       "(Ultralytics' run: weights/best.pt, results.csv), student.json.")
STUDENT_OPT = typer.Option("yolo11n-seg.yaml", "--student", help="Ultralytics model: a yaml it ships (from "
                           "scratch; -seg for masks, plain for boxes) or a local .pt to fine-tune.")
VAL_FRACTION_OPT = typer.Option(0.2, "--val-fraction", help="Share of images held out for validation, by a "
                                "seeded hash of the image id (0: validate on the training images).")
SEED_OPT = typer.Option(0, "--seed", help="Seed of the split and of Ultralytics' training.")
EPOCHS_OPT = typer.Option(100, "--epochs", help="Ultralytics epochs.")
IMGSZ_OPT = typer.Option(640, "--imgsz", help="Ultralytics training image size.")
BATCH_OPT = typer.Option(16, "--batch", help="Ultralytics batch size.")
DEVICE_OPT = typer.Option("auto", "--device", help="Ultralytics device: cpu, 0, 0,1, ... (auto: GPU 0 if there is "
                          "one).")
WORKERS_OPT = typer.Option(8, "--workers", help="Ultralytics data-loading workers (0: in process).")
AMP_OPT = typer.Option(False, "--amp/--no-amp", help="Mixed precision on CUDA (Ultralytics checks it with "
                       "yolo26n.pt, which must then be in its weights folder: offline it warns).")
COPY_OPT = typer.Option(False, "--copy", help="Copy the images into dataset/ instead of linking them.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace a previous train-student run in --out.")


def train_student_command(
    masks: Path = MASKS_OPT,
    tags: Path = TAGS_OPT,
    images: Path = IMAGES_OPT,
    out: Path = OUT_OPT,
    student: str = STUDENT_OPT,
    val_fraction: float = VAL_FRACTION_OPT,
    seed: int = SEED_OPT,
    epochs: int = EPOCHS_OPT,
    imgsz: int = IMGSZ_OPT,
    batch: int = BATCH_OPT,
    device: str = DEVICE_OPT,
    workers: int = WORKERS_OPT,
    amp: bool = AMP_OPT,
    copy: bool = COPY_OPT,
    overwrite: bool = OVERWRITE_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Train a YOLO student (Ultralytics, offline) on the masks: export, seeded train/val split, train."""
    from tagclip_cli.student import StudentConfig, train_student

    setup_logging(quiet, verbose)
    if quiet:
        os.environ["YOLO_VERBOSE"] = "False"  # read by Ultralytics when it is imported
    if device == "auto":
        import torch

        device = "0" if torch.cuda.is_available() else "cpu"
    config = StudentConfig(masks=masks, out=out, tags=tags, images=images, student=student,
                           val_fraction=val_fraction, seed=seed, epochs=epochs, imgsz=imgsz, batch=batch,
                           device=device, workers=workers, amp=amp, copy=copy, overwrite=overwrite)
    run = train_student(config)
    if not quiet:
        shown = {k.removeprefix("metrics/"): round(v, 4) for k, v in run.metrics.items()}
        err_console.print(f"{run.out}: {run.task} student trained on {run.train_images} images, validated on "
                          f"{run.val_images}; weights {run.weights}; {shown}", highlight=False, soft_wrap=True)


def student_predict_command(
    weights: Path = typer.Argument(..., help="Trained student weights (train-student's student/weights/best.pt)."),
    images: Path = typer.Argument(..., help="Folder of images (ids relative to it, as for segment)."),
    png_dir: Path = typer.Option(..., "--png-dir", help="Output: one label PNG per image and categories.json, "
                                 "what `tagclip evaluate --pred DIR` reads."),
    imgsz: int = typer.Option(640, "--imgsz", help="Inference image size (the training one)."),
    conf: float = typer.Option(0.25, "--conf", help="Ultralytics confidence threshold."),
    device: str = typer.Option("cpu", "--device", help="Ultralytics device: cpu, 0, ..."),
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Write a trained student's masks as label PNGs, to score it with `tagclip evaluate`."""
    from tagclip_cli.student import predict_label_pngs

    setup_logging(quiet, verbose)
    os.environ["YOLO_VERBOSE"] = "False"
    count = predict_label_pngs(weights, images, png_dir, imgsz=imgsz, device=device, conf=conf)
    if not quiet:
        err_console.print(f"{png_dir}: {count} label PNGs", highlight=False)
