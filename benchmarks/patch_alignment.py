"""Patch-level text alignment of a shapes-demo model: do the dense patch tokens name the object under them?

TagCLIP's coarse scores are the value-path patch tokens of the last block (the backbone's own
``Backbone.dense_forward``: block L is x + out_proj(v(ln_1(x))) then the MLP, then ln_post/proj on
every token) compared with the prompt-ensemble text classifier. This measures, on held-out scenes
(stream ``--seed``, not used by training (0) or by bench_synthetic (1000)), how often those tokens
pick the right object class among the 12 object classes (chance 1/12 = 8.3%):

  patch top-1      over patches at least half covered by one object: argmax class == that object
  object top-1     per object: the patch logits averaged with the object's pixel coverage of each
                   patch as weights (so objects smaller than a patch count too), argmax == the object
  class token      for reference: top-1 of the global class token for the salient object
  ... -> salient   patches of non-salient objects whose argmax is the scene's salient object
                   (global content leaking into every patch instead of local content)

split into single-object scenes, salient objects of multi-object scenes, and non-salient objects.

    .venv/bin/python benchmarks/patch_alignment.py                          # the shipped model
    .venv/bin/python benchmarks/patch_alignment.py --checkpoint runs/shapes-demo/shapes-demo.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_synthetic import load_model, normalise  # noqa: E402

from tagclip_cli.synthetic import OBJECT_CLASSES, generate_scene  # noqa: E402

ALIGN_STREAM = 2000


def coverage(label_map: np.ndarray, patch: int, num_classes: int) -> np.ndarray:
    """(gh*gw, 1 + num_classes) share of each patch's pixels per label (0 = background)."""
    h, w = label_map.shape
    gh, gw = h // patch, w // patch
    cells = label_map[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
    cells = cells.reshape(gh * gw, patch * patch)
    out = np.zeros((gh * gw, 1 + num_classes), np.float32)
    for k in range(1 + num_classes):
        out[:, k] = (cells == k).mean(axis=1)
    return out


def measure(bb, count: int, seed: int, batch_size: int) -> dict:
    from tagclip_cli.tagclip import tagclip_templates

    nc = len(OBJECT_CLASSES)
    text = bb.text_classifier(list(OBJECT_CLASSES), tagclip_templates())  # (12, D)
    scenes = [generate_scene(i, seed=seed) for i in range(count)]
    hits: dict[str, list[int]] = {k: [0, 0] for k in (
        "patch single", "patch salient (multi)", "patch non-salient",
        "object single", "object salient (multi)", "object non-salient",
        "class token single", "class token salient (multi)", "patch non-salient -> salient",
    )}  # fmt: skip
    with torch.inference_mode():
        for first in range(0, count, batch_size):
            chunk = scenes[first : first + batch_size]
            pixels = torch.stack([normalise(s, bb.mean, bb.std) for s in chunk])
            dense = bb.dense_forward(pixels)
            patches = torch.nn.functional.normalize(dense.tokens[:, 1:].float(), dim=-1) @ text.T  # (B, N, 12)
            glob = torch.nn.functional.normalize(bb.encode_image(pixels), dim=-1) @ text.T  # (B, 12)
            for j, scene in enumerate(chunk):
                logits = patches[j].numpy()
                cov = coverage(scene.label_map, bb.patch_size, nc)
                single = len(scene.objects) == 1
                for rank, name in enumerate(scene.objects):
                    k = OBJECT_CLASSES.index(name)
                    group = "single" if single else ("salient (multi)" if rank == 0 else "non-salient")
                    mostly = cov[:, k + 1] >= 0.5
                    if mostly.any():
                        top = logits[mostly].argmax(axis=1)
                        hits[f"patch {group}"][0] += int((top == k).sum())
                        hits[f"patch {group}"][1] += int(mostly.sum())
                        if group == "non-salient":
                            hits["patch non-salient -> salient"][0] += int(
                                (top == OBJECT_CLASSES.index(scene.salient)).sum()
                            )
                            hits["patch non-salient -> salient"][1] += int(mostly.sum())
                    weights = cov[:, k + 1]
                    pooled = (weights[:, None] * logits).sum(axis=0) / weights.sum()
                    hits[f"object {group}"][0] += int(pooled.argmax() == k)
                    hits[f"object {group}"][1] += 1
                    if rank == 0:
                        key = "class token single" if single else "class token salient (multi)"
                        hits[key][0] += int(int(glob[j].argmax()) == k)
                        hits[key][1] += 1
    return {k: {"top1": 100.0 * h / n if n else float("nan"), "n": n} for k, (h, n) in hits.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-demo")
    ap.add_argument("--checkpoint", type=Path, action="append", default=None,
                    help="a training checkpoint (repeatable); without it, the shipped model")  # fmt: skip
    ap.add_argument("--count", type=int, default=300, help="held-out scenes")
    ap.add_argument("--seed", type=int, default=ALIGN_STREAM, help="scene stream")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for ckpt in args.checkpoint or [None]:
        start = time.time()
        bb = load_model(args.model, ckpt)
        bb.cache_dir = None
        label = str(ckpt) if ckpt else f"builtin {args.model}"
        if ckpt is not None:
            from safetensors import safe_open

            with safe_open(str(ckpt), "pt") as f:
                step = (f.metadata() or {}).get("step")
            if step:
                label += f" (step {step})"
        res = measure(bb, args.count, args.seed, args.batch_size)
        results[label] = res
        print(f"\n{label}: {args.count} scenes (stream {args.seed}), chance 8.3%, {time.time() - start:.0f}s")
        for key, v in res.items():
            print(f"  {key:30s} {v['top1']:5.1f}%  (n={v['n']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
