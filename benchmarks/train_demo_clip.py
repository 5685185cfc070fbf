"""Train the small ``shapes-demo`` CLIP on synthetic scenes (tagclip_cli.synthetic), on CPU.

The model is open_clip's own ``CLIP`` class with a small config (ViT, 224 px, patch 16 -> a 14x14
grid like ViT-B/16; small text tower; QuickGELU). It is a *stand-in* for a CLIP with local
patch-text alignment, not a small CLIP: trained contrastively alone for an hour on a CPU, a model
this size never gets the alignment OpenAI's CLIP has (its patch tokens over small objects named
their object 5.6% of the time, chance 8.3%), and TagCLIP rests on it. So the loss has three terms:

- open_clip's contrastive ``ClipLoss`` on web-style captions that mostly name only the largest
  object of each scene: the salience bias that makes the class token favour the salient object,
  as with real CLIP;
- ``--patch-weight`` x a per-patch loss (:func:`patch_loss`): every value-path patch token, exactly
  as TagCLIP scores it (``Backbone.dense_forward``), is classified against the text embeddings of
  the 12 shapes and the 6 background textures (the ``shapes`` vocabulary's classes then background
  set), with the pixel shares under the patch (the generator's ground truth) as soft target;
- ``--attention-weight`` x an attention loss (:func:`attention_loss`) on the layers DMAR averages:
  each patch's attention should fall on patches of its own class.

Reproducible from ``--seed``: training scene ``i`` is ``generate_scene(i, seed=TRAIN_STREAM)``, read
in order, the prompt template of each class at each step is drawn from ``default_rng([seed, step])``,
and torch is seeded. (Bitwise equality of the weights also needs the same torch build and thread
count.) Checkpoints (fp16 safetensors + the open_clip JSON config; the recipe in the safetensors
metadata) are written every ``--save-every`` steps, so a partial run is usable; ``--stop-at N`` gives
exactly the step-N checkpoint of the full schedule.

    # the shipped weights (5.5 minutes on two threads of an idle 2-core CPU; see docs/getting-started.md):
    .venv/bin/python benchmarks/train_demo_clip.py --precision bf16 --steps 280 --warmup 30 \
        --batch-size 32 --threads 2 --workers 1 --seed 0 --out runs/shapes-demo
    cp runs/shapes-demo/shapes-demo.{json,safetensors} tagclip_cli/weights/

``--precision bf16`` trains in manual mixed precision (for CPUs with AMX / AVX512-BF16, where a
bf16 forward/backward is several times faster than fp32; ``torch.autocast`` on CPU is not used
because it copies every weight inside every matmul): the master weights and AdamW stay fp32, a
bf16 copy of the model runs the forward and backward pass (weights copied in before each step,
gradients copied back as fp32), and the features are cast to fp32 before the losses.
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

from tagclip_cli.backbone import Backbone
from tagclip_cli.synthetic import DEFAULT_SIZE, OBJECT_CLASSES, STUFF_CLASSES, Scene, generate_scene
from tagclip_cli.tagclip import tagclip_templates

log = logging.getLogger("train_demo_clip")

TRAIN_STREAM = 0  # scene stream used for training; benchmarks use other streams
MODEL_NAME = "shapes-demo"
MODEL_CONFIG: dict = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 8, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
# The columns of the per-patch targets: the shapes vocabulary's foreground classes, then its
# background set (vocabularies/shapes.txt lists the stuff textures as background, in this order).
TARGET_CLASSES: tuple[str, ...] = OBJECT_CLASSES + STUFF_CLASSES
MEAN = np.array(open_clip.OPENAI_DATASET_MEAN, np.float32)
STD = np.array(open_clip.OPENAI_DATASET_STD, np.float32)


def patch_targets(scene: Scene, patch: int) -> np.ndarray:
    """(N, 12 + 6) share of each patch's pixels per class of ``TARGET_CLASSES`` (objects, then the
    stuff behind the uncovered pixels); rows sum to 1, N = (H / patch) * (W / patch), row-major."""
    objects = scene.label_map.astype(np.int64) - 1
    label = np.where(objects >= 0, objects, len(OBJECT_CLASSES) + scene.stuff_map.astype(np.int64))
    h, w = label.shape
    gh, gw = h // patch, w // patch
    cells = label[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    counts = np.stack([np.bincount(row, minlength=len(TARGET_CLASSES)) for row in cells])
    return (counts / cells.shape[1]).astype(np.float32)


class SceneStream(Dataset):
    """Scenes ``offset + i`` as (normalised image (3, 224, 224), tokenised caption (context_length,),
    per-patch targets (196, 18) from :func:`patch_targets`)."""

    def __init__(self, length: int, stream: int, offset: int = 0) -> None:
        self.length, self.stream, self.offset = length, stream, offset
        self.tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=MODEL_CONFIG["text_cfg"]["context_length"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scene = generate_scene(self.offset + i, seed=self.stream, size=DEFAULT_SIZE)
        image = (scene.image.astype(np.float32) / 255.0 - MEAN) / STD
        tokens = self.tokenizer([scene.caption])[0]
        targets = torch.from_numpy(patch_targets(scene, MODEL_CONFIG["vision_cfg"]["patch_size"]))
        return torch.from_numpy(image.transpose(2, 0, 1).copy()), tokens, targets


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def value_path_and_class_token(bb: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, D) value-path patch tokens exactly as TagCLIP scores them (``Backbone.dense_forward``,
    docs/algorithm.md §1), the (B, D) ordinary class-token embedding (what ``encode_image`` gives),
    sharing blocks 1..L-1 (the class token is block L with normal attention on the same input), and
    the (B, L, 1+N, 1+N) head-averaged attention maps DMAR and CAA read."""
    dense = bb.dense_forward(images, keep_pre_last=True)
    if not dense.tokens.requires_grad:
        raise RuntimeError("Backbone.dense_forward returned no gradient: it must keep autograd when enabled")
    x, _ = bb.block_forward(bb.num_layers - 1, dense.pre_last)
    return dense.tokens[:, 1:], bb.project_tokens(x[:, :1])[:, 0], dense.attn


def attention_loss(attn: torch.Tensor, targets: torch.Tensor, layers: slice, object_weight: float) -> torch.Tensor:
    """The second auxiliary loss: in the layers DMAR averages (docs/algorithm.md §3: L-3..L-1), each
    patch's attention should fall on patches of its own class: -log of the attention mass a patch puts
    on patches sharing its label (soft: the product of the two patches' pixel shares), averaged over
    patches with the weights of :func:`patch_loss`. attn (B, L, 1+N, 1+N), targets (B, N, 18). The class
    token's row is left alone (it has to look at the whole scene)."""
    maps = attn[:, layers, 1:, 1:].float()  # (B, l, N, N) patch queries, patch keys
    same = targets @ targets.transpose(1, 2)  # (B, N, N)
    mass = (maps * same[:, None]).sum(dim=-1).clamp_min(1e-6)  # (B, l, N)
    weight = 1 + (object_weight - 1) * targets[..., : len(OBJECT_CLASSES)].sum(dim=-1)  # (B, N)
    return (weight[:, None] * -mass.log()).sum() / (weight.sum() * maps.shape[1])


def patch_loss(
    patches: torch.Tensor, class_text: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, object_weight: float
) -> torch.Tensor:
    """The auxiliary loss: cross-entropy of each patch's softmax over the 18 target classes (as the
    coarse scores of docs/algorithm.md §2 compute it: logit scale x cosine) against the patch's pixel
    shares (:func:`patch_targets`). patches (B, N, D), class_text (18, D) normalised, targets (B, N, 18).
    A patch counts 1 + (object_weight - 1) x its object share: objects cover few patches, and those
    are the ones TagCLIP has to find."""
    logits = scale * torch.nn.functional.normalize(patches.float(), dim=-1) @ class_text.T
    ce = -(targets * logits.log_softmax(dim=-1)).sum(dim=-1)  # (B, N)
    weight = 1 + (object_weight - 1) * targets[..., : len(OBJECT_CLASSES)].sum(dim=-1)
    return (weight * ce).sum() / weight.sum()


def save_checkpoint(model: torch.nn.Module, out: Path, step: int, recipe: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{MODEL_NAME}.safetensors.tmp"
    metadata = {"step": str(step), "format": "pt"}
    if recipe is not None:
        metadata["recipe"] = json.dumps(recipe, sort_keys=True)
    save_file(state, str(tmp), metadata=metadata)
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
    ap.add_argument("--patch-weight", type=float, default=1.0, help="weight of the per-patch loss (0: plain CLIP)")
    ap.add_argument("--attention-weight", type=float, default=0.5,
                    help="weight of the attention loss on DMAR's layers (0: none)")  # fmt: skip
    ap.add_argument("--object-weight", type=float, default=3.0,
                    help="a patch fully covered by an object counts this many background patches")  # fmt: skip
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

    recipe = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "save_every")}
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
    # The tool's own Backbone around the model being trained, so that the patch loss sees exactly the
    # value-path tokens TagCLIP scores (Backbone.dense_forward). Backbone freezes its model on
    # construction; training turns the gradients back on.
    bb = Backbone(model=compute, tokenizer=None, name=MODEL_NAME, weights="training", device=torch.device("cpu"),
                  cache_dir=None)  # fmt: skip
    compute.requires_grad_(True)
    tokenizer = data.tokenizer
    templates = tagclip_templates()
    dmar_layers = slice(max(0, bb.num_layers - 4), bb.num_layers - 1)  # 0-based: DMAR's L-3..L-1
    log.info("precision %s; loss weights: patch %.2f, attention %.2f (layers %s), object patches x%.1f",
             args.precision, args.patch_weight, args.attention_weight, dmar_layers, args.object_weight)  # fmt: skip

    model.train()
    compute.train()
    start = time.time()
    running = None
    for step, (images, tokens, targets) in enumerate(loader):
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if shadow is not None:
            shadow.sync_weights()
            images = images.to(torch.bfloat16)
        # One template per target class per step (seeded by step): over the run every class meets
        # every template of the 85-prompt ensemble the tool's classifier averages.
        pick = np.random.default_rng([args.seed, step]).integers(len(templates), size=len(TARGET_CLASSES))
        prompts = tokenizer([templates[t].format(c) for t, c in zip(pick, TARGET_CLASSES, strict=True)])
        patches, cls, attn = value_path_and_class_token(bb, images)
        # Features and the losses in fp32 whatever the compute precision (normalised in fp32 too).
        image_features = torch.nn.functional.normalize(cls.float(), dim=-1)
        text_all = torch.nn.functional.normalize(compute.encode_text(torch.cat([tokens, prompts])).float(), dim=-1)
        text_features, class_text = text_all[: len(tokens)], text_all[len(tokens) :]
        scale = compute.logit_scale.float().exp()
        clip = loss_fn(image_features, text_features, scale)
        patch = patch_loss(patches, class_text, targets, scale, args.object_weight)
        affinity = attention_loss(attn, targets, dmar_layers, args.object_weight)
        loss = clip + args.patch_weight * patch + args.attention_weight * affinity
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
                "step %d/%d loss %.4f (ema %.4f; contrastive %.3f, patch %.3f, attention %.3f) lr %.2e scale %.1f "
                "%.2fs/step elapsed %.0fs",
                step, args.steps, loss.item(), running, clip.item(), patch.item(), affinity.item(), lr,
                model.logit_scale.exp().item(),
                elapsed / (step + 1), elapsed,
            )  # fmt: skip
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            save_checkpoint(model, args.out, step + 1, recipe)
            log.info("saved checkpoint at step %d to %s", step + 1, args.out)
        if args.stop_at is not None and step + 1 >= args.stop_at:
            save_checkpoint(model, args.out, step + 1, recipe)
            log.info("stopping at step %d of a %d-step schedule (--stop-at)", step + 1, args.steps)
            break
    log.info("done in %.0fs", time.time() - start)


if __name__ == "__main__":
    main()
