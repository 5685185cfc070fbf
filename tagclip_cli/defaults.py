"""The defaults of a run, written once: the config dataclasses (`TagCLIPConfig`, `ModelOptions`,
`JobOptions`), the Python API (`tagclip_cli.api`, `tagclip_cli.commands`) and the command options
(`tagclip_cli.cli`) all take them from here.

A plain module with no imports, so that the command line can show them in `--help` without loading
torch."""

from __future__ import annotations

MODEL = "ViT-B-16"  # the paper's CLIP
PRETRAINED = "openai"  # open_clip's pretrained tag
DEVICE = "auto"  # cuda when available, else cpu
PRECISION = "fp32"
TAG_THRESHOLD = 0.5  # TagCLIP: normalised fused score above this (docs/algorithm.md §6)
TAG_METHOD = "tagclip"  # annotate --method: TagCLIP, the paper's
PIAA_DENSE = "sclip"  # annotate --method piaa --dense: the dense variant of PIAA's patch features
PIAA_SETTING = "voc"  # annotate --method piaa --setting: the authors' constants (docs/algorithm.md §13)
PIAA_BANK_SIZE = 512  # patches kept per class by PIAA's fit
SEGMENT_METHOD = "clses"  # CLS-SEG, the paper's
SEGMENT_SETTING = "voc"  # docs/algorithm.md §11
BATCH_SIZE = 8  # images per forward
WORKERS = 2  # decoding processes
MAX_SIDE = 1024  # longer image side for the model (pixels)
PART_SIZE = 256  # rows per part file of OUT.parts/

# The student (tagclip_cli.student: train-student, student-predict), in Ultralytics' terms.
STUDENT_MODEL = "yolo11n-seg.yaml"  # a yaml Ultralytics ships: trained from scratch
STUDENT_VAL_FRACTION = 0.2  # images held out for validation
STUDENT_EPOCHS = 100
STUDENT_IMGSZ = 640  # training and inference image size
STUDENT_BATCH_SIZE = 16
STUDENT_WORKERS = 8  # data-loading workers
STUDENT_CONF = 0.25  # confidence threshold of student-predict
