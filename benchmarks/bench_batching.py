"""Several images per forward: size bucketing vs padding vs neither, on a VOC-like mix of sizes.

The dense forward runs at each image's native grid, so images of different sizes cannot simply be
stacked. Strategies, timed on the dense forward (what batching changes), same images each time:
- single:    one image per forward (baseline);
- arrival:   batches of B in input order, split by size inside the batch (no bucketing);
- bucketed:  what `tagclip annotate` does: windows of 4*B images, same-size batches of up to B;
- padded:    batches of B in input order, each padded to the largest height and width in the
             batch, one forward per batch (the cost of an attention-mask scheme; the mask itself
             is left out, which only flatters padding).

    .venv/bin/python benchmarks/bench_batching.py                 # ViT-B-16, random weights, CPU
    .venv/bin/python benchmarks/bench_batching.py --images 64 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from tagclip_cli.backbone import load_backbone
from tagclip_cli.data import DecodedImage, bucket_batches
from tagclip_cli.jobs.runner import WINDOW_BATCHES
from tagclip_cli.sources import ImageItem

# Shares of the most common PASCAL VOC image sizes (width x height), then rounded up to the patch.
VOC_SIZES = [((500, 375), 0.50), ((375, 500), 0.20), ((500, 333), 0.12), ((333, 500), 0.05),
             ((500, 400), 0.05), ((500, 500), 0.04), ((500, 281), 0.04)]


def voc_like_images(n: int, patch: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([w for _, w in VOC_SIZES])
    picks = torch.multinomial(weights, n, replacement=True, generator=gen).tolist()
    images = []
    for k in picks:
        w, h = VOC_SIZES[k][0]
        hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
        images.append(torch.randn(3, hp, wp, generator=gen))
    return images


def plan(strategy: str, images: list[torch.Tensor], batch: int) -> list[list[int]]:
    """Forward groups (lists of image positions) of a strategy; padded groups may mix sizes."""
    n = len(images)
    if strategy == "single":
        return [[i] for i in range(n)]
    if strategy == "padded":
        return [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]
    if strategy == "arrival":
        groups = []
        for s in range(0, n, batch):
            by_size: dict[tuple, list[int]] = {}
            for i in range(s, min(n, s + batch)):
                by_size.setdefault(tuple(images[i].shape), []).append(i)
            groups.extend(by_size.values())
        return groups
    if strategy == "bucketed":
        records = [DecodedImage(ImageItem(i, str(i), str(i)), images[i]) for i in range(n)]
        return [[r.item.index for r in b] for b, _ in bucket_batches(records, batch, batch * WINDOW_BATCHES) if b]
    raise ValueError(strategy)


def padded_stack(images: list[torch.Tensor]) -> torch.Tensor:
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = torch.zeros(len(images), 3, h, w)
    for j, im in enumerate(images):
        out[j, :, : im.shape[1], : im.shape[2]] = im
    return out


@torch.inference_mode()
def run(strategy: str, images: list[torch.Tensor], batch: int, backbone) -> tuple[float, int, int]:
    """(seconds, forwards, tokens computed) of the dense forwards of all images."""
    groups = plan(strategy, images, batch)
    p = backbone.patch_size
    tokens = 0
    start = time.perf_counter()
    for group in groups:
        if strategy == "padded":
            pixels = padded_stack([images[i] for i in group])
        else:
            pixels = torch.stack([images[i] for i in group])
        pixels = pixels.to(backbone.device)
        tokens += pixels.shape[0] * (pixels.shape[2] // p) * (pixels.shape[3] // p)
        backbone.dense_forward(pixels)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, len(groups), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategies", default="single,arrival,bucketed,padded")
    args = ap.parse_args()
    backbone = load_backbone(args.model, "random", device=args.device, cache_dir=None)
    images = voc_like_images(args.images, backbone.patch_size)
    run("single", images[:2], args.batch_size, backbone)  # warm-up
    sizes = len({tuple(im.shape) for im in images})
    print(f"{args.model} (random weights) on {args.device}, {torch.get_num_threads()} threads; {args.images} "
          f"VOC-like images ({sizes} sizes), batch size {args.batch_size}")
    results = {}
    for strategy in args.strategies.split(","):
        seconds, forwards, tokens = run(strategy, images, args.batch_size, backbone)
        results[strategy] = seconds
        print(f"  {strategy:9s} {forwards:4d} forwards, {tokens / args.images:6.0f} tokens/image, "
              f"{args.images / seconds:6.2f} images/s", flush=True)
    if "single" in results:
        base = results["single"]
        print("  ratio to single (higher is faster): " + ", ".join(
            f"{k} {base / v:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()
