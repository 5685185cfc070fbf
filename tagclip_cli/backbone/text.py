"""The text side of CLIP: prompt embeddings and the prompt-ensemble classifier with its on-disk cache
(docs/algorithm.md §7). The templates are the methods' (tagclip.py, methods/); the backbone only
offers CLIP's own 80 ImageNet templates, as open_clip ships them."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tagclip_cli import progress
from tagclip_cli.errors import OutputWriteError
from tagclip_cli.fileio import atomic_path

log = logging.getLogger(__name__)

TEXT_CACHE_VERSION = 1


def imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates as format strings, taken from open_clip's metadata."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


@torch.inference_mode()
def encode_prompts(
    model: torch.nn.Module, tokenizer, device: torch.device, prompts: Sequence[str], batch_size: int = 256
) -> Tensor:
    """L2-normalised text embeddings of prompts, (P, D) fp32 on the device (a progress task: minutes
    for a large vocabulary on a CPU)."""
    out = []
    with progress.task("encoding prompts", total=len(prompts)) as advance:
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(list(prompts[start : start + batch_size])).to(device)
            emb = model.encode_text(tokens).float()
            out.append(F.normalize(emb, dim=-1))
            advance(len(tokens))
    return torch.cat(out)


class TextCache:
    """Class embeddings on disk, one file per (model identity, template list)."""

    def __init__(self, cache_dir: Path, identity: dict, templates: Sequence[str]) -> None:
        key = json.dumps(
            {"v": TEXT_CACHE_VERSION, "identity": identity, "templates": list(templates)}, sort_keys=True
        )
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
        self.path = Path(cache_dir) / "text" / f"{digest}.pt"

    def load(self) -> dict[str, Tensor]:
        if not self.path.exists():
            return {}
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
            return dict(data["classes"])
        except Exception as exc:  # a corrupt cache is rebuilt, never fatal
            log.warning("text cache %s unreadable (%s); re-encoding", self.path, exc)
            return {}

    def save(self, classes: dict[str, Tensor]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                torch.save({"classes": classes}, tmp)
        except (OSError, OutputWriteError) as exc:
            log.warning("could not write text cache %s (%s)", self.path, exc)


def classifier(
    encode: Callable[[Sequence[str]], Tensor], names: Sequence[str], templates: Sequence[str],
    cache: TextCache | None,
) -> Tensor:
    """Prompt-ensemble classifier (C, D) on the CPU: per class, the mean of its normalised template
    embeddings (`encode`: prompts -> (P, D) normalised), re-normalised. Classes already in the
    cache are not encoded again; the others are added to it."""
    cached = cache.load() if cache else {}
    missing = [n for n in dict.fromkeys(names) if n not in cached]
    if cache:
        log.info(
            "text cache: %d of %d classes from cache%s",
            len(set(names)) - len(missing),
            len(set(names)),
            f" ({cache.path})" if not missing else f", encoding {len(missing)} x {len(templates)} prompts",
        )
    if missing:
        prompts = [t.format(n) for n in missing for t in templates]
        emb = encode(prompts).reshape(len(missing), len(templates), -1)
        class_emb = F.normalize(emb.mean(dim=1), dim=-1).cpu()
        cached.update({n: class_emb[i] for i, n in enumerate(missing)})
        if cache:
            cache.save(cached)
    return torch.stack([cached[n] for n in names])


def warn_truncated(model: torch.nn.Module, tokenizer, names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Warn once per class whose prompts the tokenizer cuts at the text context; returns them."""
    from tagclip_cli.vocab import truncated_names

    encode = getattr(tokenizer, "encode", None)
    context = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77))
    if encode is None:  # not a BPE tokenizer we can count with (HF tokenizers): nothing to say
        return []
    long = truncated_names(list(dict.fromkeys(names)), templates, lambda text: len(encode(text)), context)
    for name in long:
        log.warning("class '%s' is longer than the %d-token text context; its prompts are truncated",
                    name, context)
    return long
