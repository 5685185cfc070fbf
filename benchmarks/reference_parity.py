"""Compare `tagclip annotate --reference-compat` scores with the authors' TagCLIP code.

Nothing of the reference is shipped here: point --reference at your own checkout of
github.com/linyq2117/TagCLIP. The script runs the reference's `classify()` on the given images
(CPU, fp32, VOC classes + background set), captures the per-image foreground scores it computes,
and compares them with the `scores` column of our Parquet.

    tagclip annotate IMAGES --vocab voc --checkpoint W.pt --reference-compat --out ours.parquet
    python benchmarks/reference_parity.py --reference ~/src/TagCLIP --checkpoint W.pt \
        --images IMAGES --ours ours.parquet

W.pt must be an OpenAI-layout ViT-B/16 state dict (e.g. a seeded random open_clip ViT-B-16
quickgelu `state_dict()`, or OpenAI's weights). Images must be .jpg files directly in IMAGES.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def _stub_missing_modules() -> None:
    """The reference imports lxml and pkg_resources at module level but needs neither here."""
    if "lxml" not in sys.modules:
        try:
            import lxml  # noqa: F401
        except ImportError:
            stub = types.ModuleType("lxml")
            stub.etree = None
            sys.modules["lxml"] = stub
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub


def reference_scores(reference: Path, checkpoint: Path, images: Path, names: list[str]) -> np.ndarray:
    _stub_missing_modules()
    sys.path.insert(0, str(reference))
    import classify  # the reference's script, driven through its module globals
    from clip.build_model import build_model

    model = build_model("ViT-B/16", torch.load(checkpoint, map_location="cpu")).float().eval()
    classify.device = "cpu"
    classify.model = model
    classify.model_type = "clip"
    classify.args = types.SimpleNamespace(dataset="voc2007", img_root=str(images), save_file=False)
    classify.class_names = classify.class_names_voc + classify.BACKGROUND_CATEGORY_VOC
    classify.NUM_CLASSES = len(classify.class_names_voc)
    classify.image_list = names
    classify.all_label_list = [["0"] for _ in names]
    captured: dict[str, torch.Tensor] = {}
    compute_ap = classify.compute_AP

    def capture(predictions, labels):
        captured["scores"] = predictions.clone()
        return compute_ap(predictions, labels)

    classify.compute_AP = capture
    classify.classify()
    return captured["scores"].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="checkout of linyq2117/TagCLIP")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--ours", type=Path, required=True, help="Parquet from tagclip annotate --reference-compat")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    rows = {r["image_id"]: r["scores"] for r in pq.read_table(args.ours).to_pylist()}
    names = sorted(n for n in os.listdir(args.images) if n.endswith(".jpg"))
    missing = [n for n in names if n not in rows]
    if missing:
        sys.exit(f"{args.ours}: no rows for {missing}")
    ref = reference_scores(args.reference, args.checkpoint, args.images, names)
    ours = np.array([rows[n] for n in names], dtype=np.float64)
    diff = np.abs(ref - ours)
    for name, d in zip(names, diff.max(axis=1), strict=True):
        print(f"{name}: max |reference - ours| = {d:.3g}")
    print(f"overall max abs difference: {diff.max():.3g} (tolerance {args.tolerance:g})")
    sys.exit(0 if diff.max() <= args.tolerance else 1)


if __name__ == "__main__":
    main()
