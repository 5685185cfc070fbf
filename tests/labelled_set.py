"""A small labelled set for threshold tests: a tags Parquet with given scores and the folder ground
truth (`--gt folder`) of the same images."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from tagclip_cli.tagclip import tags_from_scores
from tagclip_cli.writers import tags_schema


def write_tags_file(path, scores, status=None, threshold=0.5, classes=("lo", "hi", "a", "b")):
    """A tags Parquet of 8x8 images img<i>.png: scores per class, tags by the threshold, failed rows."""
    meta = {"tool": "tagclip-cli", "classes": list(classes), "tagclip": {"tag_threshold": threshold}}
    rows = []
    for i, s in enumerate(scores):
        failed = status is not None and status[i] != "ok"
        tags = [] if failed else [classes[c] for c in tags_from_scores(torch.tensor(s, dtype=torch.float32),
                                                                     threshold)]
        rows.append({"index": i, "image_id": f"img{i}.png", "path": f"/x/img{i}.png", "width": 8, "height": 8,
                     "status": "failed" if failed else "ok", "error": "broken" if failed else None,
                     "tags": tags, "scores": None if failed else list(s)})
    pq.write_table(pa.Table.from_pylist(rows, schema=tags_schema(meta)), path)
    return meta


def write_folder_gt(root, positives: list[set[int]], classes=("lo", "hi", "a", "b")):
    """Label PNGs in root/labels with a stripe of value c + 1 for each positive class c."""
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i, present in enumerate(positives):
        png = np.zeros((8, 8), np.uint8)
        for c in present:
            png[c, :] = c + 1
        Image.fromarray(png).save(root / "labels" / f"img{i}.png")
