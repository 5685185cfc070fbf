"""Quality benchmark on held-out synthetic shapes scenes with the bundled shapes-demo CLIP.

Checks the TagCLIP paper's claim at small scale: CLIP's class token favours the salient object
and misses small, non-salient ones; patch-level scores with DMAR and CWR recover them.

Rows (multi-label mAP over the 12 object classes, non-interpolated AP averaged over classes):
  (a) global class token: standard encode_image at 224 px, softmax over fg + bg classes with the
      85-template classifier (the paper's CLIP baseline)
  (b) coarse patch scores only          (c) coarse + DMAR
  (d) coarse + CWR                      (e) full TagCLIP (DMAR + CWR)
plus tag precision / recall / F1 and the number of scenes whose tag set is exactly right.
"all" is mAP over every test image; "non-salient" scores each class only on the images where it is
absent or present but not the largest object (images where it is the salient object are left
out), i.e. how well the small/occluded objects are found. Segmentation rows (CLS-SEG, MaskCLIP)
(CLS-SEG from TagCLIP's tags, from the true tags, and MaskCLIP) report mIoU over background +
12 object classes, the stuff textures counting as background.

    .venv/bin/python benchmarks/bench_synthetic.py            # 500 test scenes
    .venv/bin/python benchmarks/bench_synthetic.py --quick    # 100 test scenes

Deterministic: the test scenes are generate_scene(i, seed=--seed) for i < --count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tagclip_cli.synthetic import OBJECT_CLASSES, Scene, generate_scene

log = logging.getLogger("bench_synthetic")

TEST_STREAM = 1000  # training uses stream 0 (benchmarks/train_demo_clip.py)


# ---- metrics --------------------------------------------------------------------------------------


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Non-interpolated AP: mean over positives of the precision at their rank (NaN if none).

    Ties are broken by a stable sort on descending score (image order)."""
    if positive.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def mean_ap(scores: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(mAP in %, per-class AP) of scores (I, F) against truth (I, F) bool; valid (I, F) masks images
    out per class."""
    aps = []
    for c in range(truth.shape[1]):
        keep = np.ones(len(truth), bool) if valid is None else valid[:, c]
        aps.append(average_precision(scores[keep, c], truth[keep, c]))
    aps = np.array(aps)
    return 100.0 * float(np.nanmean(aps)), aps


def tag_f1(pred: Sequence[set[int]], truth: Sequence[set[int]]) -> tuple[float, float, float]:
    """Micro precision, recall, F1 (%) of predicted tag sets."""
    tp = sum(len(p & t) for p, t in zip(pred, truth, strict=True))
    n_pred = sum(len(p) for p in pred)
    n_true = sum(len(t) for t in truth)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_true if n_true else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return 100 * prec, 100 * rec, 100 * f1


def confusion_iou(pred: np.ndarray, truth: np.ndarray, num_classes: int, acc: np.ndarray) -> None:
    """Accumulate a (K, K) confusion matrix (truth rows) in place; 255 in truth is ignored."""
    keep = truth != 255
    idx = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    acc += np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: np.ndarray) -> float:
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return 100.0 * float((inter[present] / union[present]).mean())


# ---- runs -----------------------------------------------------------------------------------------


def load_model(model: str, checkpoint: Path | None):
    import open_clip

    from tagclip_cli.backbone import WEIGHTS_DIR, load_backbone

    if checkpoint is not None:  # a training checkpoint of the same architecture (development only)
        open_clip.add_model_config(checkpoint.with_suffix(".json"))
        if model not in open_clip.list_models():
            open_clip.add_model_config(WEIGHTS_DIR / f"{model}.json")
        return load_backbone(model=model, checkpoint=checkpoint, model_explicit=True, device="cpu")
    return load_backbone(model=model, device="cpu")


def normalise(scene: Scene, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) CLIP-normalised float tensor of a scene image."""
    x = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_global(bb, vocab, images: list[torch.Tensor], batch_size: int) -> np.ndarray:
    """(I, F) softmax over fg + bg of the class-token embedding (the CLIP baseline)."""
    from tagclip_cli.tagclip import tagclip_templates

    text = bb.text_classifier(vocab.all_names, tagclip_templates())
    out = []
    with torch.inference_mode():
        for chunk in batched(images, batch_size):
            pixels = torch.stack(chunk)
            size = bb.native_size
            if pixels.shape[-1] != size or pixels.shape[-2] != size:
                pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic")
            emb = torch.nn.functional.normalize(bb.encode_image(pixels), dim=-1)
            probs = (bb.logit_scale * emb @ text.T).softmax(dim=-1)
            out.append(probs[:, : vocab.num_classes].numpy())
    return np.concatenate(out)


def run_tagger(bb, vocab, images: list[torch.Tensor], batch_size: int, **config) -> tuple[np.ndarray, list]:
    """(I, F) TagCLIP scores and the predicted tag lists for one configuration."""
    from tagclip_cli.tagclip import TagCLIPConfig, Tagger

    tagger = Tagger(bb, vocab, TagCLIPConfig(**config))
    scores, tags = [], []
    for chunk in batched(images, batch_size):
        for out in tagger.tag(chunk):
            scores.append(out.scores.cpu().numpy())
            tags.append(set(out.tags))
    return np.stack(scores), tags


def run_segmentation(bb, vocab, scenes, images, batch_size) -> dict[str, float]:
    """mIoU (%, 13 classes: background + 12 objects) of CLS-SEG from TagCLIP's tags, of CLS-SEG from
    the ground-truth tags (an oracle for the tagging step), and of MaskCLIP."""
    try:
        from tagclip_cli.methods.clses import ClsSegSegments
        from tagclip_cli.methods.maskclip import MaskClipSegments
    except ImportError:
        log.warning("tagclip_cli.methods not available: segmentation rows skipped")
        return {}
    k = vocab.num_classes + 1
    truth_tags = [[OBJECT_CLASSES.index(o) for o in s.objects] for s in scenes]
    runs = {
        "CLS-SEG (TagCLIP tags)": (ClsSegSegments(bb, vocab), False),
        "CLS-SEG (ground-truth tags)": (ClsSegSegments(bb, vocab, run_tagclip=False), True),
        "MaskCLIP": (MaskClipSegments(bb, vocab, run_tagclip=False), None),
    }
    out = {}
    for name, (segmenter, oracle) in runs.items():
        start = time.time()
        conf = np.zeros((k, k), np.int64)
        for first in range(0, len(images), batch_size):
            chunk = images[first : first + batch_size]
            sizes = [tuple(s.label_map.shape) for s in scenes[first : first + batch_size]]
            if oracle is None:  # MaskCLIP ignores tags (it scores every class)
                tags = [[] for _ in chunk]
            else:
                tags = truth_tags[first : first + batch_size] if oracle else None
            for j, seg in enumerate(segmenter.segment(chunk, sizes, tags=tags)):
                confusion_iou(seg.label_map, scenes[first + j].label_map, k, conf)
        out[name] = miou(conf)
        log.info("%s: %.1fs", name, time.time() - start)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 test scenes instead of 500")
    ap.add_argument("--count", type=int, default=None, help="number of test scenes (overrides --quick)")
    ap.add_argument("--seed", type=int, default=TEST_STREAM, help="scene stream of the test set")
    ap.add_argument("--model", default="shapes-demo")
    ap.add_argument("--checkpoint", type=Path, default=None, help="development: a training checkpoint")
    ap.add_argument("--vocab", default="shapes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from tagclip_cli.tagclip import tags_from_scores
    from tagclip_cli.vocab import load_vocabulary

    vocab = load_vocabulary(args.vocab)
    if vocab.classes != OBJECT_CLASSES:
        raise SystemExit(f"vocabulary {args.vocab} does not list the synthetic object classes in order")
    count = args.count or (100 if args.quick else 500)
    t0 = time.time()
    bb = load_model(args.model, args.checkpoint)
    bb.cache_dir = None  # always encode the prompts: the benchmark must not depend on a cache
    scenes = [generate_scene(i, seed=args.seed) for i in range(count)]
    images = [normalise(s, bb.mean, bb.std) for s in scenes]
    nf = vocab.num_classes
    truth = np.zeros((count, nf), bool)
    salient = np.zeros((count, nf), bool)
    for i, s in enumerate(scenes):
        for name in s.objects:
            truth[i, OBJECT_CLASSES.index(name)] = True
        salient[i, OBJECT_CLASSES.index(s.salient)] = True
    non_salient_valid = ~salient
    n_small = int((truth & ~salient).sum())
    log.info("%d test scenes (stream %d), %d objects, %d non-salient; model %s (%s)",
             count, args.seed, int(truth.sum()), n_small, bb.name, bb.weights)  # fmt: skip

    rows: list[tuple[str, np.ndarray, list | None, float]] = []

    def timed(name: str, fn: Callable[[], tuple[np.ndarray, list | None]]) -> None:
        start = time.time()
        scores, tags = fn()
        rows.append((name, scores, tags, time.time() - start))
        log.info("%s: %.1fs", name, time.time() - start)

    timed("(a) global class token (CLIP)", lambda: (run_global(bb, vocab, images, args.batch_size), None))
    for name, cfg in [
        ("(b) coarse patch scores", {"use_dmar": False, "use_cwr": False}),
        ("(c) coarse + DMAR", {"use_dmar": True, "use_cwr": False}),
        ("(d) coarse + CWR", {"use_dmar": False, "use_cwr": True}),
        ("(e) TagCLIP (DMAR + CWR)", {"use_dmar": True, "use_cwr": True}),
    ]:
        timed(name, lambda cfg=cfg: run_tagger(bb, vocab, images, args.batch_size, **cfg))

    truth_sets = [set(np.nonzero(t)[0].tolist()) for t in truth]
    results: dict = {"count": count, "seed": args.seed, "model": bb.name, "weights": bb.weights, "rows": {}}
    print()
    print(f"Synthetic shapes test set: {count} scenes (stream {args.seed}), {int(truth.sum())} objects, "
          f"{n_small} of them non-salient; model {bb.name}")  # fmt: skip
    print()
    print("| method | mAP all | mAP non-salient | tag P / R / F1 | exact tag sets | time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, scores, tags, seconds in rows:
        m_all, ap_all = mean_ap(scores, truth)
        m_small, _ = mean_ap(scores, truth, non_salient_valid)
        if tags is None:  # the class-token baseline: the same tag rule as TagCLIP
            tags = [set(tags_from_scores(torch.from_numpy(s), 0.5)) for s in scores]
        p, r, f1 = tag_f1(tags, truth_sets)
        exact = sum(t == g for t, g in zip(tags, truth_sets, strict=True))
        print(f"| {name} | {m_all:.1f} | {m_small:.1f} | {p:.0f} / {r:.0f} / {f1:.0f} | {exact} | {seconds:.0f} |")
        results["rows"][name] = {
            "map": m_all, "map_non_salient": m_small, "tag_precision": p, "tag_recall": r, "tag_f1": f1,
            "exact_tag_sets": exact, "per_class_ap": dict(zip(OBJECT_CLASSES, ap_all.tolist(), strict=True)),
        }  # fmt: skip
    seg = run_segmentation(bb, vocab, scenes, images, args.batch_size)
    if seg:
        print()
        print("| segmenter | mIoU (background + 12 objects) |")
        print("|---|---:|")
        for name, value in seg.items():
            print(f"| {name} | {value:.1f} |")
    results["segmentation"] = seg
    print(f"\ntotal {time.time() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
