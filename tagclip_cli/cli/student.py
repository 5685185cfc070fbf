"""The student commands: train-student (a YOLO model on our masks) and student-predict (its label PNGs)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tagclip_cli import defaults
from tagclip_cli.cli.common import QUIET_OPT, VERBOSE_OPT, err_console, setup_logging
from tagclip_cli.cli.surface import INPUT, JOB, METHOD, MODEL, OUTPUT

MASKS_OPT = typer.Option(..., "--masks", metavar="FILE", rich_help_panel=INPUT,
                         help="Masks of `tagclip segment` (COCO JSON or masks Parquet).")
TAGS_OPT = typer.Option(None, "--tags", metavar="FILE", rich_help_panel=INPUT,
                        help="Tags Parquet of the same run: checked against the masks and its vocabulary names the "
                        "classes.")
IMAGES_OPT = typer.Option(None, "--images", metavar="DIR", rich_help_panel=INPUT,
                          help="Folder the image ids are relative to (default: the paths recorded in the tags file).")
OUT_OPT = typer.Option(..., "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
                       help="Run folder: dataset/, train.txt, val.txt, data.yaml, student/ (Ultralytics' run: "
                       "weights/best.pt, results.csv), student.json.")
STUDENT_OPT = typer.Option(defaults.STUDENT_MODEL, "--student", metavar="NAME|FILE", rich_help_panel=MODEL,
                           help="Ultralytics model: a yaml it ships (from scratch; -seg for masks, plain for boxes) "
                           "or a local .pt to fine-tune.")
VAL_FRACTION_OPT = typer.Option(defaults.STUDENT_VAL_FRACTION, "--val-fraction", metavar="FLOAT",
                                rich_help_panel=METHOD,
                                help="Share of images held out for validation, by a seeded hash of the image id "
                                "(0: validate on the training images).")
SEED_OPT = typer.Option(0, "--seed", metavar="N", rich_help_panel=METHOD,
                        help="Seed of the split and of Ultralytics' training.")
EPOCHS_OPT = typer.Option(defaults.STUDENT_EPOCHS, "--epochs", metavar="N", rich_help_panel=METHOD,
                          help="Ultralytics epochs.")
IMGSZ_OPT = typer.Option(defaults.STUDENT_IMGSZ, "--imgsz", metavar="PIXELS", rich_help_panel=METHOD,
                         help="Ultralytics training image size.")
AMP_OPT = typer.Option(False, "--amp/--no-amp", rich_help_panel=METHOD,
                       help="Mixed precision on CUDA (Ultralytics checks it with yolo26n.pt, which must then be in its "
                       "weights folder: offline it warns).")
COPY_OPT = typer.Option(False, "--copy", rich_help_panel=OUTPUT,
                        help="Copy the images into dataset/ instead of linking them.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT,
                             help="Replace a previous train-student run in --out.")
BATCH_SIZE_OPT = typer.Option(defaults.STUDENT_BATCH_SIZE, "--batch-size", metavar="N", rich_help_panel=JOB,
                              help="Images per training batch (Ultralytics' batch).")
DEVICE_OPT = typer.Option(defaults.DEVICE, "--device", metavar="DEVICE", rich_help_panel=JOB,
                          help="auto (GPU 0 when there is one, else CPU), cpu, cuda, cuda:N, or Ultralytics' N or "
                          "N,M (several GPUs).")
WORKERS_OPT = typer.Option(defaults.STUDENT_WORKERS, "--workers", metavar="N", rich_help_panel=JOB,
                           help="Ultralytics data-loading workers (0: in process).")


def train_student_command(
    masks: Path = MASKS_OPT,
    tags: Path = TAGS_OPT,
    images: Path = IMAGES_OPT,
    student: str = STUDENT_OPT,
    val_fraction: float = VAL_FRACTION_OPT,
    seed: int = SEED_OPT,
    epochs: int = EPOCHS_OPT,
    imgsz: int = IMGSZ_OPT,
    amp: bool = AMP_OPT,
    out: Path = OUT_OPT,
    copy: bool = COPY_OPT,
    overwrite: bool = OVERWRITE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    device: str = DEVICE_OPT,
    workers: int = WORKERS_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Train a YOLO student (Ultralytics, offline) on the masks: export, seeded train/val split, train."""
    from tagclip_cli.student import StudentConfig, train_student, ultralytics_device

    setup_logging(quiet, verbose)
    if quiet:
        os.environ["YOLO_VERBOSE"] = "False"  # read by Ultralytics when it is imported
    config = StudentConfig(masks=masks, out=out, tags=tags, images=images, student=student,
                           val_fraction=val_fraction, seed=seed, epochs=epochs, imgsz=imgsz, batch=batch_size,
                           device=ultralytics_device(device), workers=workers, amp=amp, copy=copy, overwrite=overwrite)
    run = train_student(config)
    if not quiet:
        shown = {k.removeprefix("metrics/"): round(v, 4) for k, v in run.metrics.items()}
        err_console.print(f"{run.out}: {run.task} student trained on {run.train_images} images, validated on "
                          f"{run.val_images}; weights {run.weights}; {shown}", highlight=False, soft_wrap=True)


PREDICT_OUT_OPT = typer.Option(..., "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT,
                               help="Label PNG folder: one label PNG per image and categories.json, what `tagclip "
                               "evaluate --masks DIR` reads.")
PREDICT_IMGSZ_OPT = typer.Option(defaults.STUDENT_IMGSZ, "--imgsz", metavar="PIXELS", rich_help_panel=METHOD,
                                 help="Inference image size (the training one).")
PREDICT_CONF_OPT = typer.Option(defaults.STUDENT_CONF, "--conf", metavar="FLOAT", rich_help_panel=METHOD,
                                help="Ultralytics confidence threshold.")


def student_predict_command(
    weights: Path = typer.Argument(..., metavar="WEIGHTS",
                                   help="Trained student weights (train-student's student/weights/best.pt)."),
    images: Path = typer.Argument(..., metavar="IMAGES", help="Folder of images (ids relative to it, as for segment)."),
    imgsz: int = PREDICT_IMGSZ_OPT,
    conf: float = PREDICT_CONF_OPT,
    out: Path = PREDICT_OUT_OPT,
    device: str = DEVICE_OPT,
    quiet: bool = QUIET_OPT,
    verbose: bool = VERBOSE_OPT,
) -> None:
    """Write a trained student's masks as label PNGs, to score it with `tagclip evaluate`."""
    from tagclip_cli.student import predict_label_pngs

    setup_logging(quiet, verbose)
    os.environ["YOLO_VERBOSE"] = "False"
    count = predict_label_pngs(weights, images, out, imgsz=imgsz, device=device, conf=conf)
    if not quiet:
        err_console.print(f"{out}: {count} label PNGs", highlight=False)
