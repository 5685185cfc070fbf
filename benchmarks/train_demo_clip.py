"""Train the small ``shapes-demo`` CLIP on synthetic scenes (tagclip_cli.synthetic), on CPU.

The model is open_clip's own ``CLIP`` class with a small config (ViT, 224 px, patch 16 -> a 14x14
grid like ViT-B/16; small text tower; QuickGELU), trained with open_clip's contrastive ``ClipLoss``
on web-style captions that mostly name only the largest object of each scene. That salience bias
in the captions is what makes the class token favour the salient object, as with real CLIP.

Reproducible from ``--seed``: training scene ``i`` is ``generate_scene(i, seed=TRAIN_STREAM)``, read
in order, and torch is seeded. (Bitwise equality of the weights also needs the same torch build and
thread count.) Checkpoints (fp16 safetensors + the open_clip JSON config) are written every
``--save-every`` steps, so a partial run is usable.

    # the shipped weights (42 minutes on a 2-core AMX CPU):
    .venv/bin/python benchmarks/train_demo_clip.py --precision bf16 --steps 1500 --batch-size 64 \
        --threads 2 --workers 1 --seed 0 --out runs/shapes-demo-bf16
    cp runs/shapes-demo-bf16/shapes-demo.{json,safetensors} tagclip_cli/weights/

``--precision bf16`` trains in manual mixed precision (for CPUs with AMX / AVX512-BF16, where a
bf16 forward/backward is several times faster than fp32; ``torch.autocast`` on CPU is not used
because it copies every weight inside every matmul): the master weights and AdamW stay fp32, a
bf16 copy of the model runs the forward and backward pass (weights copied in before each step,
gradients copied back as fp32), and the features are cast to fp32 before the contrastive loss.
Checkpoints are written from the fp32 master weights either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from tagclip_cli.synthetic import DEFAULT_SIZE, generate_scene

log = logging.getLogger("train_demo_clip")

TRAIN_STREAM = 0  # scene stream used for training; benchmarks use other streams
MODEL_NAME = "shapes-demo"
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 8, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
MEAN = np.array(open_clip.OPENAI_DATASET_MEAN, np.float32)
STD = np.array(open_clip.OPENAI_DATASET_STD, np.float32)


class SceneStream(Dataset):
    """Scenes ``offset + i`` as (normalised image (3, 224, 224), tokenised caption (context_length,))."""

    def __init__(self, length: int, stream: int, offset: int = 0) -> None:
        self.length, self.stream, self.offset = length, stream, offset
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=MODEL_CONFIG["text_cfg"]["context_length"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        scene = generate_scene(self.offset + i, seed=self.stream, size=DEFAULT_SIZE)
        image = (scene.image.astype(np.float32) / 255.0 - MEAN) / STD
        tokens = self.tokenizer([scene.caption])[0]
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), tokens


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(model: torch.nn.Module, out: Path, step: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{MODEL_NAME}.safetensors.tmp"
    save_file(state, str(tmp), metadata={"step": str(step), "format": "pt"})
    tmp.replace(out / f"{MODEL_NAME}.safetensors")
    (out / f"{MODEL_NAME}.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")


class BF16Shadow:
    """Manual mixed precision: a bf16 copy of ``master`` for the forward/backward pass.

    ``sync_weights`` copies the fp32 master weights (and buffers) into the copy; ``grads_to_master``
    sets each master parameter's ``.grad`` to the copy's gradient in fp32. Parameters are matched by
    name, so the copy is an ordinary module of the same class (open_clip's ``CLIP``)."""

    def __init__(self, master: torch.nn.Module) -> None:
        import copy

        self.master = master
        self.model = copy.deepcopy(master).to(torch.bfloat16)
        self.pairs = list(zip(master.parameters(), self.model.parameters(), strict=True))
        self.buffer_pairs = list(zip(master.buffers(), self.model.buffers(), strict=True))

    @torch.no_grad()
    def sync_weights(self) -> None:
        for src, dst in self.pairs:
            dst.copy_(src)
        for src, dst in self.buffer_pairs:
            if src.is_floating_point():
                dst.copy_(src)

    @torch.no_grad()
    def grads_to_master(self) -> None:
        for master, low in self.pairs:
            if low.grad is None:
                master.grad = None
            else:
                master.grad = low.grad.float()
                low.grad = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: manual mixed precision (fp32 master weights and AdamW, bf16 forward/backward copy); "
        "fast on CPUs with AMX/AVX512-BF16",
    )
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this many steps (the learning-rate schedule still spans --steps)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/shapes-demo"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = open_clip.CLIP(**MODEL_CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, config %s", n_params / 1e6, json.dumps(MODEL_CONFIG))

    # No weight decay on gains, biases, embeddings and the logit scale (as open_clip's trainer).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_gain = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if is_gain or "embedding" in name or "token" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    data = SceneStream(args.steps * args.batch_size, stream=TRAIN_STREAM + args.seed)
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )

    shadow = BF16Shadow(model) if args.precision == "bf16" else None
    compute = shadow.model if shadow is not None else model
    log.info("precision %s", args.precision)

    model.train()
    compute.train()
    start = time.time()
    running = None
    for step, (images, tokens) in enumerate(loader):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if shadow is not None:
            shadow.sync_weights()
            images = images.to(torch.bfloat16)
        # Features and the loss in fp32 whatever the compute precision (normalised in fp32 too).
        image_features = torch.nn.functional.normalize(compute.encode_image(images).float(), dim=-1)
        text_features = torch.nn.functional.normalize(compute.encode_text(tokens).float(), dim=-1)
        loss = loss_fn(image_features, text_features, compute.logit_scale.float().exp())
        loss.backward()
        if shadow is not None:
            shadow.grads_to_master()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            log.info(
                "step %d/%d loss %.4f (ema %.4f) lr %.2e scale %.1f %.2fs/step elapsed %.0fs",
                step, args.steps, loss.item(), running, lr, model.logit_scale.exp().item(),
                elapsed / (step + 1), elapsed,
            )  # fmt: skip
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            save_checkpoint(model, args.out, step + 1)
            log.info("saved checkpoint at step %d to %s", step + 1, args.out)
        if args.stop_at is not None and step + 1 >= args.stop_at:
            save_checkpoint(model, args.out, step + 1)
            log.info("stopping at step %d of a %d-step schedule (--stop-at)", step + 1, args.steps)
            break
    log.info("done in %.0fs", time.time() - start)


if __name__ == "__main__":
    main()
