"""Speed of the batched engine against a naive reference-style loop and against the bare encoder.

A randomly initialised ViT-B/16 (a real-size model; weights do not change the cost) tags VOC-like
photos (sample photos from scikit-image cropped to 500x375 and 375x500, mixed) with the VOC
vocabulary (20 classes + 25 background). In the same run, on the same images, batch by batch in
rotating order (the machine is shared and noisy: the ratios are the figure):

- annotate (ours): `Tagger.tag` on a batch (the `tagclip annotate` engine);
- annotate (naive): `benchmarks/naive.py`, one image and one class at a time, batch-1 CWR
  forwards, attention maps from nn.MultiheadAttention in every forward, fp32;
- encoder-only: the forwards TagCLIP cannot avoid, each done the fastest way this torch offers,
  i.e. with fused attention (scaled_dot_product_attention) and no attention maps: one
  native-resolution forward per image (same-size images batched, all tokens through ln_post and
  proj) plus one batched forward of exactly the CWR crops our run used, with their class-token
  masks (`Backbone.masked_cls_forward`, which is already fused). No attention maps, no DMAR, no box
  search, no crop resizing, no fusion. (open_clip's own blocks are slower than this on CPU:
  with a per-crop mask nn.MultiheadAttention leaves its fast path, so they would flatter us.)
- segment (ours): `ClsSegSegments.segment` (CLS-SEG: TagCLIP, then batched Grad-CAMs of all tags on the
  same dense forward, CAA, label maps at the original size);
- the stage profile (ours, timed after each batch): the bare encoder, the dense forward as
  annotate runs it (the maps its method declares, read during the forward: their cost is the
  difference), the CWR crop forward; the rest of annotate and segment's CLS-SEG part by difference.
- segment (naive): the naive TagCLIP time of the same images plus a naive CLIP-ES pass (its own
  dense forward, one last-block backward and one affinity computation per tag), as the reference
  runs classify.py and then generate_cams;
- one layer's attention (after the timed rounds, on the first batch's first same-size group): the
  fused kernel of the encoder-only row against the parts of the explicit attention every
  map-making layer runs (fp32 scores and softmax, head mean, value mixing), on the same q, k, v.
  Their ratio is the machine's price of a map: it is what moves annotate's ratio to the
  encoder-only row from one CPU to another (about even on AVX512-BF16 without AMX; several times
  in bf16 on an AMX Xeon, whose fused bf16 kernel runs on AMX tiles while the map's fp32 scores
  cannot);
- one batch's memory (annotate and segment, each in a fresh child process with glibc's mmap
  threshold fixed at 64 KiB, so that freed tensors leave the resident set): the live peak of one
  first batch, the same from run to run; the peak-per-batch column of the first table also counts
  what the allocator kept from earlier methods and moves by 100 MB and more between runs.

Machine line: the CPU's model name and the instruction sets that pick the kernels (torch's CPU
capability, AMX, AVX512-BF16): ratios from different CPUs are not comparable.

Peak RSS per method is the process's VmHWM, reset before each method (/proc/self/clear_refs), so
it includes the model (about 0.6 GB) and whatever the allocator kept from earlier methods; peak
per batch is how far it rose above the RSS before the batch (the batch's own working memory).

The model's logit scale is set to 100 (the value of every OpenAI CLIP checkpoint) so that the CWR
candidate count is realistic (1-4 per image); with the random initial 14.3 nearly every class
becomes a candidate (--init-logit-scale shows that worst case). The text classifier is one
template per class (text encoding is timed separately and reported as per-run setup).

    .venv/bin/python benchmarks/bench_speed.py            # 16 images, batches of 8
    .venv/bin/python benchmarks/bench_speed.py --quick    # 8 images, batches of 4 (make bench)
    .venv/bin/python benchmarks/bench_speed.py --quick --precision bf16
    .venv/bin/python benchmarks/bench_speed.py --quick --repeat 3   # + the ratio from each batch's minimum of 3

On a GPU (or with --batch-sizes) it sweeps instead: no naive loop; for each precision of
--precision (comma-separated) and each batch size of --batch-sizes, `rounds` batches of one image
size each are timed (after one warm-up batch) through annotate (`Tagger.tag`), segment
(`ClsSegSegments.segment`) and their parts: the dense forward with attention maps
(`Backbone.dense_forward`), the same forward fused and without maps (so the maps' cost is the
difference), and the batched CWR crop forward (`Backbone.masked_cls_forward`). Printed per
configuration: images/s, peak GPU memory (torch.cuda.max_memory_allocated) and each part's share
of the time (decode in one process, encoder, attention maps, CWR crops, the rest of TagCLIP,
CLS-SEG); JPEG decoding on the GPU (torchvision.io.decode_jpeg) is timed once for comparison.

    python benchmarks/bench_speed.py --device cuda --model ViT-L-14 --precision fp32,bf16,fp16 \
        --batch-sizes 8,16,32,64 --json-out out/vit-l.json

--precision bf16 runs ours and the encoder-only forwards with `--precision bf16` (on CPU: the image
tower's weights in bf16, attention maps still fp32 softmax) on a second copy of the same weights;
the naive loop stays fp32, as the reference runs. The score difference and the tag agreement
with the naive loop then measure what bf16 changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive import NaiveClsSeg, NaiveTagCLIP  # noqa: E402

from tagclip_cli.backbone import Backbone, fused_attention, load_backbone  # noqa: E402
from tagclip_cli.data import Preprocess, load_rgb  # noqa: E402
from tagclip_cli.tagclip import Tagger, TagOutput, crop_for_cwr, tagclip_templates  # noqa: E402
from tagclip_cli.vocab import load_vocabulary  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat", "colorwheel", "camera")
VOC_SIZES = ((500, 375), (375, 500))


# ---- measurement helpers ---------------------------------------------------------------------------


def cpu_description() -> str:
    """The CPU's model name and the instruction sets that decide the bf16 and attention kernels
    (torch's CPU capability; AMX and AVX512-BF16 from /proc/cpuinfo where there is one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [torch.backends.cpu.get_cpu_capability()]
    isa += [name for flag, name in (("amx_tile", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return f"{model} ({', '.join(isa)})"


def minimum_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Each function's minimum wall time (s) over `repeats` calls, the functions alternating: on a
    virtual machine whose single runs scatter by several percent, the minimum is the cost."""
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - start)
    return best


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(field: str = "VmHWM") -> float:
    """VmHWM (or another /proc/self/status field, e.g. VmRSS) of this process in MB (ru_maxrss
    where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Method:
    name: str
    seconds: float = 0.0
    images: int = 0
    peak_rss: float = 0.0
    batch_peak: float = 0.0  # the most the peak RSS rose above the RSS before one batch
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    def run(self, fn: Callable[[], object], images: int) -> object:
        reset_peak_rss()
        before = peak_rss_mb("VmRSS")
        start = time.perf_counter()
        result = fn()
        self.seconds += time.perf_counter() - start
        self.images += images
        self.peak_rss = max(self.peak_rss, peak_rss_mb())
        self.batch_peak = max(self.batch_peak, self.peak_rss - before)
        return result


# ---- inputs -------------------------------------------------------------------------------------


def load_photos(bb: Backbone, paths: Sequence[Path]) -> tuple[list[Tensor], list[tuple[int, int]], float]:
    """Photos decoded and preprocessed for bb: (images, original (h, w) sizes, seconds spent
    decoding, resizing and normalising)."""
    pre = Preprocess(bb.patch_size, bb.mean, bb.std)
    start = time.perf_counter()
    rgb = [load_rgb(str(p)) for p in paths]
    images = [pre(im) for im in rgb]
    return images, [(im.height, im.width) for im in rgb], time.perf_counter() - start


def make_photos(root: Path, count: int, seed: int = 0) -> list[Path]:
    """count JPEGs, alternately 500x375 and 375x500, random crops of scikit-image sample photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        arr = getattr(data, PHOTOS[i % len(PHOTOS)])()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        arr = arr[..., :3]
        w, h = VOC_SIZES[i % 2]
        ih, iw = arr.shape[:2]
        scale = max(w / iw, h / ih) * rng.uniform(1.0, 1.3)
        img = Image.fromarray(arr).resize((max(w, round(iw * scale)), max(h, round(ih * scale))), Image.BICUBIC)
        x0 = int(rng.integers(0, img.width - w + 1))
        y0 = int(rng.integers(0, img.height - h + 1))
        path = root / f"{i:03d}.jpg"
        img.crop((x0, y0, x0 + w, y0 + h)).save(path, quality=90)
        paths.append(path)
    return paths


# ---- encoder-only -------------------------------------------------------------------------------


def bare_dense(bb: Backbone, pixels: Tensor) -> Tensor:
    """The native-resolution forward with fused attention and no maps: (B, 1+N, D)."""
    x = bb.embed(pixels)
    for block in bb.visual.transformer.resblocks:
        x = x + block.ls_1(fused_attention(block.attn, block.ln_1(x), None))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return bb.project_tokens(x)


def encoder_only(bb: Backbone, images: Sequence[Tensor], crops: Tensor | None, keep: Tensor | None) -> None:
    groups: dict[tuple[int, int], list[Tensor]] = {}
    for img in images:
        groups.setdefault(tuple(img.shape[-2:]), []).append(img)
    for same in groups.values():
        bare_dense(bb, torch.stack(same))
    if crops is not None and len(crops):
        bb.masked_cls_forward(crops, keep)


def cwr_inputs(bb: Backbone, images: Sequence[Tensor], outputs: Sequence[TagOutput]):
    """The crops and masks our run forwarded (prepared outside the timed region)."""
    pairs = [
        crop_for_cwr(img, box, bb.patch_size, bb.native_grid)
        for img, out in zip(images, outputs, strict=True)
        for box in out.boxes
    ]
    if not pairs:
        return None, None
    crops, keep = zip(*pairs, strict=True)
    return torch.stack(crops), torch.stack(keep)


def dense_as_annotate(bb: Backbone, tagger: Tagger, pixels: Tensor) -> object:
    """The dense forward as `Tagger.tag` runs it: with the attention maps its method declares
    (`Tagger.map_needs`), or every layer's map where the tagger declares none (older trees)."""
    needs = getattr(tagger, "map_needs", None)
    return bb.dense_forward(pixels) if needs is None else bb.dense_forward(pixels, needs=needs())


def profile_stages(bb: Backbone, tagger: Tagger, images: Sequence[Tensor], crops: Tensor | None,
                   keep: Tensor | None, stages: dict[str, float]) -> None:
    """Add to stages the seconds of annotate's parts on one batch: the bare encoder (fused, no
    maps), the dense forward as annotate runs it (the difference: attention maps and whatever reads
    them during the forward) and the CWR crop forward."""
    groups: dict[tuple[int, int], list[Tensor]] = {}
    for img in images:
        groups.setdefault(tuple(img.shape[-2:]), []).append(img)
    for same in groups.values():
        pixels = torch.stack(same)
        for name, fn in (("encoder", lambda p=pixels: bare_dense(bb, p)),
                         ("dense", lambda p=pixels: dense_as_annotate(bb, tagger, p))):
            start = time.perf_counter()
            with bb.autocast():
                fn()
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
    start = time.perf_counter()
    if crops is not None and len(crops):
        bb.masked_cls_forward(crops, keep)
    stages["crops"] = stages.get("crops", 0.0) + time.perf_counter() - start


def attention_profile(bb: Backbone, pixels: Tensor, repeats: int = 3) -> dict[str, float]:
    """One layer's attention (the first block) on one batch (B, 3, H, W), milliseconds, the minimum
    of `repeats`, on the same q, k and v (their projections are not timed: every path has them):
    the fused kernel of the encoder-only row (`fused_attention`'s scaled_dot_product_attention)
    against the parts of the explicit attention that a map-making layer runs (`backbone.encoder`:
    fp32 scores and softmax, the head mean that is the layer's map, the value mixing with its
    low-precision copy of the probabilities). Their ratio is what each map costs on this machine.
    It depends on the CPU (with AMX, the fused bf16 kernel is several times faster than the fp32
    scores; without it they are about even), which is why annotate's ratio to the encoder-only row
    differs between machines."""
    from tagclip_cli.backbone.encoder import Workspace, head_average, mix_values, softmax_attention, split_qkv

    block = bb.visual.transformer.resblocks[0]
    workspace = Workspace()
    with torch.inference_mode(), bb.autocast():
        y = block.ln_1(bb.embed(pixels))
        q, k, v = split_qkv(block.attn, y)
        probs = softmax_attention(q, k, None, workspace)
        parts = {
            "fused attention (encoder-only)": lambda: F.scaled_dot_product_attention(q, k, v),
            "explicit: scores + softmax (fp32)": lambda: softmax_attention(q, k, None, workspace),
            "explicit: head mean (the map)": lambda: head_average(probs, None),
            "explicit: P @ V (with the low-precision copy)": lambda: mix_values(probs, v, workspace),
        }
        for fn in parts.values():  # warm-up
            fn()
        return {name: 1000 * t for name, t in zip(parts, minimum_times(list(parts.values()), repeats), strict=True)}


def print_attention_profile(rows: dict[str, float], shape: tuple[int, ...]) -> None:
    b, t = shape[0], shape[1]
    print()
    print(f"| one layer's attention, batch of {b}, {t} tokens | ms |")
    print("| --- | ---: |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    fused = rows["fused attention (encoder-only)"]
    explicit = sum(ms for name, ms in rows.items() if name.startswith("explicit"))
    print(f"| explicit total / fused | {explicit / fused:.2f}x |")


def print_profile(stages: dict[str, float], annotate: float, segment: float | None) -> dict[str, float]:
    """The stage table of the quick run (seconds summed over its batches); returns the rows."""
    rows = {
        "encoder (fused attention, no maps)": stages["encoder"],
        "attention maps + layer-by-layer readers (dense forward - encoder)": stages["dense"] - stages["encoder"],
        "CWR crop forward": stages["crops"],
        "TagCLIP rest (DMAR products, box search, crop prep, fusion)": annotate - stages["dense"] - stages["crops"],
    }
    if segment is not None:
        rows["CLS-SEG (Grad-CAM, CAA, label maps: segment - annotate)"] = segment - annotate
    total = segment if segment is not None else annotate
    print()
    print("| stage (ours) | seconds | share |")
    print("| --- | ---: | ---: |")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    return rows


def make_segmenter(bb: Backbone, vocab, tagger: Tagger, skip: bool):
    """The CLS-SEG engine sharing our Tagger (and its classifier), or None if unavailable."""
    if skip:
        return None
    try:
        from tagclip_cli.methods.clses import ClsSegSegments
    except ImportError:  # trees before the method registry (e.g. 083e69e), for before/after runs
        try:
            from tagclip_cli.segment import Segmenter as ClsSegSegments
        except ImportError:
            return None
    segmenter = ClsSegSegments(bb, vocab, run_tagclip=False)
    segmenter.tagger = tagger  # TagCLIP runs inside segment(), on the same dense forward
    return segmenter


# ---- one batch's memory in a fresh process -------------------------------------------------------

# glibc's mmap threshold fixed (and no trimming left to chance): every allocation of 64 KiB or more
# is its own mapping, returned to the OS when freed, so the resident set follows the live tensors and
# the peak is the batch's own, the same on every run (the peak-per-batch column above also counts
# whatever the allocator kept from earlier methods and moves from run to run by 100 MB and more).
BATCH_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def batch_memory_child(args: argparse.Namespace, workdir: Path) -> int:
    """--memory-of annotate|segment: the rise of the peak RSS over one first batch (the quick run's
    first `--batch-size` photos) in this fresh process, printed as `BATCH_MEMORY <MB>`."""
    bb = load_random(args, workdir, "fp32")
    fast = bb if args.precision == "fp32" else load_random(args, workdir, args.precision)
    vocab = load_vocabulary("voc")
    bb.cache_dir = workdir / "cache"
    text = bb.text_classifier(vocab.all_names, ("a photo of a {}.",))
    images, sizes, _ = load_photos(bb, make_photos(workdir / "photos", args.batch_size))
    tagger = Tagger(fast, vocab, text=text)
    segmenter = make_segmenter(fast, vocab, tagger, False) if args.memory_of == "segment" else None
    if args.memory_of == "segment" and segmenter is None:
        print("BATCH_MEMORY nan")
        return 0
    with torch.inference_mode():
        before = peak_rss_mb("VmRSS")
        if not reset_peak_rss():
            print("BATCH_MEMORY nan")
            return 0
        if segmenter is not None:
            segmenter.segment(images, sizes, keep_cams=True)
        else:
            tagger.tag(images)
        print(f"BATCH_MEMORY {peak_rss_mb() - before:.1f}")
    return 0


def batch_memory(args: argparse.Namespace) -> dict[str, float]:
    """Annotate's and segment's memory for one batch, each in a fresh child process under
    BATCH_MEMORY_ENV (Linux with glibc; elsewhere empty)."""
    if not Path("/proc/self/clear_refs").exists() or platform.libc_ver()[0] != "glibc":
        return {}
    result = {}
    for what in ("annotate", "segment"):
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-of", what, "--precision", args.precision,
                   "--batch-size", str(args.batch_size), "--model", args.model, "--device", args.device]
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--init-logit-scale"] if args.init_logit_scale else []
        done = subprocess.run(command, env={**os.environ, **BATCH_MEMORY_ENV}, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BATCH_MEMORY ")]
        if done.returncode or not lines:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"# batch memory of {what}: the child process failed: {last}")
            continue
        result[what] = float(lines[-1].split()[1])
    return result


def print_batch_memory(memory: dict[str, float], batch_size: int) -> None:
    if not memory:
        return
    print()
    print(f"| one batch of {batch_size}, fresh process, allocations of 64 KiB+ mapped and unmapped (live peak) | MB |")
    print("| --- | ---: |")
    for what, mb in memory.items():
        print(f"| {what} | {mb:.0f} |")


# ---- main ---------------------------------------------------------------------------------------


def text_setup(bb: Backbone, names: Sequence[str], cache: Path) -> dict:
    """Per-run text-classifier cost. Ours: one template per class, encoded cold (then cached), and a
    warm cache load. The full 85-template classifier costs the same per prompt: the naive loop
    (no cache) pays it on every run, we pay it once per model and vocabulary."""
    prompts = len(names) * len(tagclip_templates())
    bb.cache_dir = cache
    start = time.perf_counter()
    text = bb.text_classifier(names, ("a photo of a {}.",))
    cold = time.perf_counter() - start
    start = time.perf_counter()
    bb.text_classifier(names, ("a photo of a {}.",))
    warm = time.perf_counter() - start
    return {
        "text": text,
        "prompts": prompts,
        "cold_1_template_s": cold,
        "full_classifier_s": cold / len(names) * prompts,
        "warm_s": warm,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="number of photos (default 16)")
    ap.add_argument("--quick", action="store_true", help="8 photos in batches of 4 (two rounds)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per batch (default 8; 4 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--init-logit-scale",
        action="store_true",
        help="keep the random initial logit scale (14.3): nearly every class becomes a CWR candidate",
    )
    ap.add_argument("--precision", default="fp32",
                    help="precision of ours and of the encoder-only row (the naive loop is always fp32): fp32, bf16 "
                         "or fp16; comma-separated in a sweep (e.g. fp32,bf16,fp16)")
    ap.add_argument("--batch-sizes", default=None,
                    help="sweep these batch sizes (comma-separated, e.g. 8,16,32,64): the GPU mode (the default on "
                         "a non-CPU device, with 8,16,32,64)")
    ap.add_argument("--rounds", type=int, default=2, help="sweep: timed batches per configuration (default 2)")
    ap.add_argument("--no-segment", action="store_true", help="skip the segment measurements")
    ap.add_argument("--json", "--json-out", dest="json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="also time annotate and the encoder-only forwards K more times per batch, alternating, and "
                         "print their ratio from each batch's minimum (default 1: only the single timed rounds)")
    ap.add_argument("--memory-of", choices=("annotate", "segment"), default=None,
                    help=argparse.SUPPRESS)  # the child process of the one-batch memory table
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
    if bad or not precisions:
        ap.error(f"--precision: expected fp32, bf16 or fp16 (comma-separated), not {args.precision!r}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.batch_sizes is None and args.device != "cpu":
        args.batch_sizes = "8,16,32,64"
    if args.batch_sizes is not None:
        try:
            sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            ap.error(f"--batch-sizes: expected positive integers, comma-separated, not {args.batch_sizes!r}")
        if args.rounds < 1:
            ap.error("--rounds must be at least 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        workdir = Path(tempfile.mkdtemp(prefix="tagclip-bench-"))
        try:
            return sweep(args, precisions, sizes, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(precisions) != 1:
        ap.error("several precisions need --batch-sizes (the sweep)")
    args.precision = precisions[0]
    count = 8 if args.quick and args.images == 16 else args.images
    if args.batch_size is None:
        args.batch_size = 4 if args.quick else 8
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    workdir = Path(tempfile.mkdtemp(prefix="tagclip-bench-"))
    try:
        if args.memory_of:
            return batch_memory_child(args, workdir)
        return run(args, count, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_random(args: argparse.Namespace, workdir: Path, precision: str) -> Backbone:
    """The benchmark's seeded random model in `precision` (the same weights for every precision)."""
    model = load_backbone(args.model, pretrained="random", device=args.device, cache_dir=workdir / "cache",
                          precision=precision)
    if not args.init_logit_scale:
        with torch.no_grad():
            model.model.logit_scale.fill_(math.log(100.0))
    return model


def run(args: argparse.Namespace, count: int, workdir: Path) -> int:
    def load(precision: str) -> Backbone:
        return load_random(args, workdir, precision)

    bb = load("fp32")  # the naive loop's (and the text tower's) backbone
    fast = bb if args.precision == "fp32" else load(args.precision)  # same seed: the same weights
    vocab = load_vocabulary("voc")
    names = vocab.all_names
    print(
        f"# bench_speed: {args.model} (random weights, logit scale {bb.logit_scale:.1f}), VOC vocabulary "
        f"({vocab.num_classes} + {len(vocab.background)} background), {count} photos 500x375/375x500, "
        f"batch {args.batch_size}, {args.device}, ours in {args.precision} (naive fp32), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"# machine: {cpu_description()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    setup = text_setup(bb, names, workdir / "cache")
    text = setup.pop("text")
    tagger = Tagger(fast, vocab, text=text)
    naive = NaiveTagCLIP(bb, vocab.classes, vocab.background, (), text=text)

    images, original_sizes, decode_s = load_photos(bb, make_photos(workdir / "photos", count))

    with torch.inference_mode():  # warm-up (kernels, allocator); the rotating order does the rest
        tagger.tag(images[:1])

    segmenter = make_segmenter(fast, vocab, tagger, args.no_segment)
    naive_seg = NaiveClsSeg(naive, segmenter.text) if segmenter is not None else None
    ours, slow, enc = Method("annotate (ours)"), Method("annotate (naive)"), Method("encoder-only")
    seg_ours, seg_cams = Method("segment (ours)"), Method("naive CLIP-ES part")
    candidates, crops, tags, max_diff, max_cam_diff, same_tags = [], 0, [], 0.0, 0.0, 0
    stages: dict[str, float] = {}
    repeated: list[tuple[float, float]] = []  # --repeat: each batch's minimum (annotate, encoder-only)
    batches = [list(range(i, min(i + args.batch_size, len(images)))) for i in range(0, len(images), args.batch_size)]
    for round_index, indices in enumerate(batches):
        batch = [images[i] for i in indices]
        sizes = [original_sizes[i] for i in indices]
        got: dict[str, list] = {}

        def ours_block(batch=batch, sizes=sizes, got=got):
            got["ours"] = ours.run(lambda: tagger.tag(batch), len(batch))
            if segmenter is not None:
                got["seg"] = seg_ours.run(lambda: segmenter.segment(batch, sizes, keep_cams=True), len(batch))

        def naive_block(batch=batch, sizes=sizes, got=got):
            got["naive"] = slow.run(lambda: [naive(img) for img in batch], len(batch))
            if naive_seg is not None:
                jobs = list(zip(batch, [r.tags for r in got["naive"]], sizes, strict=True))
                got["naive_seg"] = seg_cams.run(lambda: [naive_seg(*job) for job in jobs], len(batch))

        blocks = [ours_block, naive_block]
        with torch.inference_mode():
            for block in blocks if round_index % 2 == 0 else blocks[::-1]:
                block()
            c, k = cwr_inputs(fast, batch, got["ours"])
            enc.run(lambda c=c, k=k, batch=batch: encoder_only(fast, batch, c, k), len(batch))
            profile_stages(fast, tagger, batch, c, k, stages)
            if args.repeat > 1:
                annotate_s, encoder_s = minimum_times([lambda batch=batch: tagger.tag(batch),
                                                       lambda c=c, k=k, batch=batch: encoder_only(fast, batch, c, k)],
                                                      args.repeat)
                repeated.append((annotate_s, encoder_s))
        for j, (out, ref) in enumerate(zip(got["ours"], got["naive"], strict=True)):
            candidates.append(len(out.candidates))
            crops += len(out.boxes)
            max_diff = max(max_diff, float((out.scores - ref.scores).abs().max()))
            same_tags += out.tags == ref.tags
            if segmenter is not None:
                seg_out, seg_ref = got["seg"][j], got["naive_seg"][j]
                tags.append(len(seg_out.tags))
                if seg_out.tags == seg_ref.tags and len(seg_out.tags):
                    max_cam_diff = max(max_cam_diff, float((seg_out.cams - seg_ref.cams).abs().max()))
        print(
            f"#   batch {round_index + 1}/{len(batches)} (cumulative s): annotate ours {ours.seconds:.1f}, "
            f"naive {slow.seconds:.1f}, encoder-only {enc.seconds:.1f}; segment ours {seg_ours.seconds:.1f}, "
            f"naive {slow.seconds + seg_cams.seconds:.1f}",
            flush=True,
        )

    first = [images[i] for i in batches[0]]
    same = torch.stack([img for img in first if img.shape == first[0].shape])
    attention = attention_profile(fast, same)
    tokens = 1 + same.shape[-2] * same.shape[-1] // fast.patch_size ** 2
    stats = {"repeated": repeated, "attention_ms": attention, "attention_shape": (same.shape[0], tokens),
             "batch_memory": batch_memory(args),
             "candidates": candidates, "crops": crops, "tags": tags, "max_diff": max_diff,
             "max_cam_diff": max_cam_diff, "same_tags": same_tags, "decode_s": decode_s, "names": len(names)}
    return report(args, count, (ours, slow, enc, seg_ours, seg_cams), segmenter is not None, stages, stats, setup)


def methods_of(ours: Method, slow: Method, enc: Method, seg_ours: Method, seg_cams: Method,
               segmented: bool) -> list[Method]:
    """The rows of the methods table; with segment, the naive segment row: the reference pipeline
    tags first (classify.py), then runs CLIP-ES on the tags, so its time is the naive TagCLIP time
    of the same images plus the naive CLIP-ES time."""
    methods = [ours, slow, enc]
    if segmented:
        seg_naive = Method(
            "segment (naive)", slow.seconds + seg_cams.seconds, slow.images, max(slow.peak_rss, seg_cams.peak_rss)
        )
        methods += [seg_ours, seg_naive]
    return methods


def print_methods(methods: Sequence[Method]) -> None:
    print()
    print("| method | images | seconds | images/s | peak RSS (MB) | peak per batch (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for m in methods:
        per_batch = f"{m.batch_peak:.0f}" if m.batch_peak else "-"
        print(f"| {m.name} | {m.images} | {m.seconds:.1f} | {m.rate:.3f} | {m.peak_rss:.0f} | {per_batch} |")


def report(args: argparse.Namespace, count: int, timed_methods: tuple[Method, ...], segmented: bool,
           stages: dict[str, float], stats: dict, setup: dict) -> int:
    """Print the quick run's tables and ratios (and write --json); returns the exit status."""
    ours, slow, enc, seg_ours, seg_cams = timed_methods
    candidates, crops, tags = stats["candidates"], stats["crops"], stats["tags"]
    max_diff, max_cam_diff, same_tags = stats["max_diff"], stats["max_cam_diff"], stats["same_tags"]
    print_methods(methods := methods_of(ours, slow, enc, seg_ours, seg_cams, segmented))
    profile = print_profile(stages, ours.seconds, seg_ours.seconds if segmented else None)
    print_attention_profile(stats["attention_ms"], stats["attention_shape"])
    memory = stats["batch_memory"]
    print_batch_memory(memory, args.batch_size)
    print()
    print(
        f"CWR candidates per image: mean {statistics.mean(candidates):.2f}, max {max(candidates)}; "
        f"crops forwarded: {crops}"
    )
    print(f"max |score(ours) - score(naive)|: {max_diff:.2e}; identical tag sets: {same_tags} of {count} images")
    if segmented:
        print(
            f"CLS-SEG tags per image: mean {statistics.mean(tags):.2f}, max {max(tags)}; "
            f"max |cam(ours) - cam(naive)|: {max_cam_diff:.2e}"
        )
    print(f"decode + resize + normalise: {count / stats['decode_s']:.1f} images/s (one process)")
    print(
        f"text classifier ({setup['prompts']} prompts, extrapolated from {stats['names']}): about "
        f"{setup['full_classifier_s']:.0f}s on every naive run (no cache); ours once per model and "
        f"vocabulary, then {setup['warm_s'] * 1000:.0f} ms from the cache (not in the images/s above)"
    )
    annotate_speedup = slow.seconds / ours.seconds
    encoder_ratio = ours.seconds / enc.seconds
    pairs = stats["repeated"]
    repeated_ratio = sum(a for a, _ in pairs) / sum(e for _, e in pairs) if pairs else None
    seg_speedup = float("nan") if not segmented else methods[-1].seconds / seg_ours.seconds
    if not segmented:
        print("segment: not measured (tagclip_cli.methods.clses not available, or --no-segment)")
    result = {
        "model": args.model,
        "images": count,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "identical_tag_sets": same_tags,
        "methods": {m.name: {"seconds": m.seconds, "images_per_s": m.rate, "peak_rss_mb": m.peak_rss,
                             "peak_per_batch_mb": m.batch_peak} for m in methods},
        "profile_s": profile,
        "attention_layer_ms": stats["attention_ms"],
        "batch_memory_mb": memory,
        "candidates_mean": statistics.mean(candidates),
        "crops": crops,
        "max_score_diff": max_diff,
        "text_setup": setup,
        "annotate_speedup_vs_naive": annotate_speedup,
        "segment_speedup_vs_naive": seg_speedup,
        "annotate_vs_encoder_only": encoder_ratio,
        "annotate_vs_encoder_only_min": repeated_ratio,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print()
    print(f"annotate speedup vs naive: {annotate_speedup:.2f}x")
    print(f"segment speedup vs naive: {'n/a' if math.isnan(seg_speedup) else f'{seg_speedup:.2f}'}x")
    if repeated_ratio is not None:
        print(f"(annotate time vs encoder-only, each batch's minimum of {args.repeat}: {repeated_ratio:.2f}x)")
    print(f"annotate time vs encoder-only: {encoder_ratio:.2f}x")
    return 0


# ---- the sweep (GPU mode) -------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., object], *args: object) -> tuple[object, float, float]:
    """(result, seconds, peak device memory in MB: NaN off CUDA) of fn(*args)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn(*args)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return result, seconds, peak


def gpu_jpeg_decode_rate(paths: Sequence[Path], device: torch.device) -> float | None:
    """Images/s of torchvision.io.decode_jpeg on the device for these files (batched), or None."""
    if device.type != "cuda":
        return None
    try:
        from torchvision.io import decode_jpeg, read_file
    except ImportError:
        return None
    data = [read_file(str(p)) for p in paths]
    try:
        decode_jpeg(data[:2], device=device)  # warm-up (nvjpeg handles)
        _, seconds, _ = timed(device, lambda: decode_jpeg(data, device=device))
    except (RuntimeError, TypeError) as exc:
        print(f"# GPU JPEG decoding unavailable: {exc}")
        return None
    return len(data) / seconds


def measure(fast: Backbone, tagger: Tagger, segmenter, images: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
            batches: Sequence[Sequence[int]], device: torch.device) -> dict:
    """Seconds of each part over the batches (after one warm-up batch), peak memory, crops run.
    Raises torch.OutOfMemoryError when a batch does not fit."""
    t = dict.fromkeys(("annotate", "segment", "dense", "bare", "crops"), 0.0)
    peaks = {"annotate": 0.0, "segment": 0.0}
    crops_run = done = 0

    def bare(stacked: Tensor) -> Tensor:
        with fast.autocast():
            return bare_dense(fast, stacked)

    with torch.inference_mode():
        tagger.tag([images[i] for i in batches[0]])  # warm-up: kernels for this shape
    if segmenter is not None:  # and the Grad-CAM backward, on two images
        segmenter.segment([images[i] for i in batches[0][:2]], [sizes[i] for i in batches[0][:2]])
    for indices in batches:
        batch = [images[i].to(device) for i in indices]
        stacked = torch.stack(batch)
        with torch.inference_mode():
            outs, s, peak = timed(device, tagger.tag, batch)
            t["annotate"] += s
            peaks["annotate"] = max(peaks["annotate"], peak)
            t["dense"] += timed(device, fast.dense_forward, stacked)[1]
            t["bare"] += timed(device, bare, stacked)[1]
            c, k = cwr_inputs(fast, batch, outs)
            if c is not None:
                t["crops"] += timed(device, fast.masked_cls_forward, c, k)[1]
                crops_run += len(c)
        if segmenter is not None:
            _, s, peak = timed(device, segmenter.segment, batch, [sizes[i] for i in indices])
            t["segment"] += s
            peaks["segment"] = max(peaks["segment"], peak)
        done += len(indices)
    return {"seconds": t, "peaks": peaks, "crops": crops_run, "images": done}


def sweep(args: argparse.Namespace, precisions: Sequence[str], batch_sizes: Sequence[int], workdir: Path) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_speed: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    def load(precision: str) -> Backbone:
        torch.manual_seed(0)
        model = load_backbone(args.model, pretrained="random", device=str(device), cache_dir=workdir / "cache",
                              precision=precision)
        if not args.init_logit_scale:
            with torch.no_grad():
                model.model.logit_scale.fill_(math.log(100.0))
        return model

    bb = load("fp32")
    vocab = load_vocabulary("voc")
    text = bb.text_classifier(vocab.all_names, ("a photo of a {}.",))
    count = args.rounds * max(batch_sizes)
    count += count % 2  # half of each VOC size
    paths = make_photos(workdir / "photos", count)
    images, sizes, decode_s = load_photos(bb, paths)
    decode_per_image = decode_s / count
    gpu_decode = gpu_jpeg_decode_rate(paths, device)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    groups = list(by_shape.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_speed sweep: {args.model} (random weights, logit scale {bb.logit_scale:.1f}), VOC vocabulary, "
          f"{count} photos 500x375/375x500 (preprocessed {[tuple(s[-2:]) for s in by_shape]}), "
          f"{args.rounds} timed batches per configuration, {device} ({name}), torch {torch.__version__}")
    print(f"# decode + resize + normalise: {1 / decode_per_image:.0f} images/s in one process"
          + (f"; torchvision.io.decode_jpeg on {device}: {gpu_decode:.0f} images/s" if gpu_decode else ""), flush=True)
    rows = []
    print()
    print("| precision | batch | annotate img/s | segment img/s | peak MB annotate | peak MB segment | decode | "
          "encoder | attn maps | CWR crops | TagCLIP rest | CLS-SEG |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for precision in precisions:
        if precision == "fp32":
            fast = bb
        elif device.type == "cuda":  # autocast: the same weights, no copy
            fast = dataclasses.replace(bb, precision=precision)
        else:  # CPU bf16 casts the image tower once: a second copy
            fast = load(precision)
        tagger = Tagger(fast, vocab, text=text)
        segmenter = make_segmenter(fast, vocab, tagger, args.no_segment)
        for bs in batch_sizes:
            batches = [groups[r % len(groups)][(r // len(groups)) * bs:(r // len(groups) + 1) * bs]
                       for r in range(args.rounds)]
            row = {"model": args.model, "precision": precision, "batch_size": bs}
            try:
                got = measure(fast, tagger, segmenter, images, sizes, batches, device)
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                row["oom"] = True
                rows.append(row)
                print(f"| {precision} | {bs} | out of memory | | | | | | | | | |", flush=True)
                continue
            t, peaks, crops_run = got["seconds"], got["peaks"], got["crops"]
            row["images"] = got["images"]
            n = row["images"]
            decode = decode_per_image * n
            maps = max(t["dense"] - t["bare"], 0.0)
            rest = max(t["annotate"] - t["dense"] - t["crops"], 0.0)
            clsseg = max(t["segment"] - t["annotate"], 0.0) if segmenter is not None else 0.0
            total = decode + (t["segment"] if segmenter is not None else t["annotate"])
            shares = {"decode": decode, "encoder": t["bare"], "attention_maps": maps, "cwr_crops": t["crops"],
                      "tagclip_rest": rest, "cls_seg": clsseg}
            row.update(
                annotate_images_per_s=n / t["annotate"],
                segment_images_per_s=n / t["segment"] if segmenter is not None else None,
                peak_mb_annotate=peaks["annotate"], peak_mb_segment=peaks["segment"] if segmenter else None,
                seconds=t, crops=crops_run, share={k: v / total for k, v in shares.items()},
            )
            rows.append(row)
            seg_rate = f"{row['segment_images_per_s']:.1f}" if segmenter is not None else "n/a"
            mem = (f"{peaks['annotate']:.0f} | {peaks['segment']:.0f}" if device.type == "cuda" else "n/a | n/a")
            print(f"| {precision} | {bs} | {row['annotate_images_per_s']:.1f} | {seg_rate} | {mem} | "
                  + " | ".join(f"{100 * v:.0f}%" for v in row["share"].values()) + " |", flush=True)
        if fast is not bb:
            del tagger, segmenter, fast
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print("Shares are of the time one process would spend on decode (single-threaded, CPU) plus segment "
          "(annotate with --no-segment); encoder = fused forward without maps, attn maps = dense forward minus "
          "that, TagCLIP rest = DMAR, box search, CWR crop preparation, fusion and host syncs.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "device": str(device), "device_name": name, "torch": torch.__version__,
            "images": count, "rounds": args.rounds, "decode_images_per_s_one_process": 1 / decode_per_image,
            "gpu_jpeg_decode_images_per_s": gpu_decode, "rows": rows,
        }, indent=2))
    return 1 if all(r.get("oom") for r in rows) else 0


Tensor = torch.Tensor

if __name__ == "__main__":
    sys.exit(main())
