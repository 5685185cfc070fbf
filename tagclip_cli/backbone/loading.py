"""Loading a CLIP ViT (docs/algorithm.md §0): open_clip models by name and pretrained tag,
checkpoint files (OpenAI TorchScript, torch pickles, safetensors), the models shipped in the
package, and the offline handling of the Hugging Face hub."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from tagclip_cli.backbone.model import Backbone, check_precision, default_cache_dir
from tagclip_cli.errors import ModelLoadError, did_you_mean
from tagclip_cli.fileio import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def builtin_models() -> list[str]:
    """Models shipped inside the package (config JSON + safetensors weights)."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if p.with_suffix(".safetensors").exists())


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A CLIP state dict from an OpenAI TorchScript archive, a torch pickle (.pt/.bin, optionally
    wrapped in {"state_dict": ...} with "module." prefixes) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable CLIP checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{path}: no state dict found in the checkpoint")
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        sd.pop(key, None)
    return sd


def _is_openai_layout(sd: dict[str, Tensor]) -> bool:
    return "visual.proj" in sd and "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def _tokenizer_for(model: torch.nn.Module, model_name: str | None):
    import open_clip

    context = int(getattr(model, "context_length", 77))
    if model_name and (model_name in open_clip.list_models() or model_name in builtin_models()):
        try:
            return open_clip.get_tokenizer(model_name, context_length=context)
        except Exception:  # unknown name (e.g. a checkpoint-inferred model): the CLIP BPE tokenizer
            pass
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


def load_backbone(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    model_explicit: bool = False,
    seed: int = 0,
    precision: str = "fp32",
) -> Backbone:
    """Load a CLIP ViT.

    - `checkpoint`: a file (see `read_state_dict`). OpenAI-layout weights build their own
      architecture (QuickGELU) unless `model_explicit`, in which case open_clip's config `model`
      is created and loaded strictly.
    - `model` naming a model shipped in the package (e.g. `shapes-demo`): loaded from the package.
    - `pretrained="random"`: seeded random weights (tests and benchmarks only).
    - otherwise open_clip's `pretrained` tag, which needs network access the first time.

    precision: fp32 (default), or bf16/fp16 autocast on CUDA (UsageError elsewhere).
    """
    check_precision(precision, device)

    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    device = torch.device(device)
    if checkpoint is not None:
        net, name = _load_checkpoint(Path(checkpoint), model, model_explicit, seed)
    elif model in builtin_models():
        net, name = _load_builtin(model), model
    elif pretrained in RANDOM_TAGS:
        log.warning("model %s with RANDOM weights (seed %d): outputs are meaningless except for testing", model, seed)
        net, name = _create(model, None, seed), model
    else:
        net, name = _create(model, pretrained, seed), model
    weights = weights_identity(model, pretrained, checkpoint, cache_dir, seed)
    net = net.float().to(device)
    if device.type == "cuda" and precision == "fp32":
        # PyTorch runs cuDNN convolutions (the patch embedding) in TF32 by default; fp32 must mean
        # fp32: TF32 keeps 10 mantissa bits, too few for CUDA scores to match the CPU's to 1e-4.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return Backbone(net, _tokenizer_for(net, name), name, weights, device, cache_dir, precision)


RANDOM_TAGS = (None, "", "none", "random")  # --pretrained values that mean seeded random weights
OPENAI_NAME_PREFIX = "openai-"  # the name of OpenAI-layout checkpoint weights: openai-vit-w768-p16-l12


def weights_identity(model: str, pretrained: str | None, checkpoint: str | Path | None, cache_dir: Path | None,
                     seed: int = 0) -> str:
    """The "weights" of `Backbone.identity()` for these load arguments, found without loading:
    "checkpoint:<sha256>", "builtin:<name>:<sha256 prefix>" (the weights' hash is part of the
    identity, so replaced weights never reuse cached text), "random:<seed>" or the pretrained tag."""
    if checkpoint is not None:
        return f"checkpoint:{file_sha256(Path(checkpoint), cache_dir)}"
    if model in builtin_models():
        return f"builtin:{model}:{file_sha256(WEIGHTS_DIR / f'{model}.safetensors', cache_dir)[:16]}"
    return f"random:{seed}" if pretrained in RANDOM_TAGS else pretrained


def identity_before_loading(model: str, pretrained: str | None = "openai", checkpoint: str | Path | None = None,
                            cache_dir: Path | None = None, model_explicit: bool = False, seed: int = 0,
                            previous: Mapping | None = None) -> dict | None:
    """The `Backbone.identity()` that `load_backbone` with these arguments gives, without loading
    it, so that a rerun is checked against its output in a second. A checkpoint without an explicit
    model is named by its weights (OpenAI-layout weights name their own architecture): then the
    identity is known only next to a `previous` identity of the same weights named that way, and
    told apart from one of other weights (the name kept: the weights alone differ); else None."""
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    weights = weights_identity(model, pretrained, checkpoint, cache_dir, seed)
    if checkpoint is None or model_explicit:
        return {"model": model, "weights": weights}
    if not isinstance(previous, Mapping) or not isinstance(previous.get("model"), str):
        return None
    if previous.get("weights") != weights or previous["model"].startswith(OPENAI_NAME_PREFIX):
        return {"model": previous["model"], "weights": weights}
    return None


def _load_checkpoint(path: Path, model: str, model_explicit: bool, seed: int) -> tuple[torch.nn.Module, str]:
    """The network of a checkpoint file and its name: OpenAI-layout weights build their own
    architecture unless `model_explicit`; otherwise open_clip's `model`, loaded strictly."""
    import open_clip

    sd = read_state_dict(path)
    if _is_openai_layout(sd) and not model_explicit:
        try:
            net = open_clip.model.build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
            net.float().load_state_dict(sd)  # the builder rounds through fp16; reload exactly
        except Exception as exc:
            raise ModelLoadError(f"{path}: OpenAI-layout weights but not a CLIP ViT ({exc})") from exc
        return net, f"{OPENAI_NAME_PREFIX}{_describe_openai(sd)}"
    net = _builtin_architecture(model) if model in builtin_models() else _create(model, None, seed)
    try:
        net.load_state_dict(_to_open_clip_layout(net, sd), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelLoadError(
            f"{path}: weights do not fit model '{model}' ({first}); pass the matching --model"
        ) from exc
    return net, model


def _describe_openai(sd: dict[str, Tensor]) -> str:
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    return f"vit-w{width}-p{patch}-l{layers}"


def _to_open_clip_layout(net: torch.nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    if "logit_scale" in sd and net.logit_scale.ndim != sd["logit_scale"].ndim:
        sd = dict(sd)
        sd["logit_scale"] = sd["logit_scale"].reshape(net.logit_scale.shape)
    return sd


def unknown_model(model: str, open_clip_models: list[str]) -> str:
    """The one line for a model name that is neither built in nor open_clip's: the closest name
    when one is close, else the built-in models and a few of open_clip's ViTs."""
    builtin = builtin_models()
    hint = did_you_mean(model, [*builtin, *open_clip_models])
    if hint:
        return f"unknown model '{model}'; {hint}"
    vits = [m for m in ("ViT-B-16", "ViT-B-32", "ViT-L-14") if m in open_clip_models]
    return (f"unknown model '{model}' (built-in: {', '.join(builtin) or 'none'}; open_clip has {len(open_clip_models)} "
            f"models, e.g. {', '.join(vits)}: python -c 'import open_clip; print(open_clip.list_models())')")


def _create(model: str, pretrained: str | None, seed: int) -> torch.nn.Module:
    import open_clip

    if model not in open_clip.list_models():
        raise ModelLoadError(unknown_model(model, open_clip.list_models()))
    if pretrained:
        try:
            tags = open_clip.list_pretrained_tags_by_model(model)
        except Exception:
            tags = []
        if pretrained not in tags and not Path(pretrained).exists():
            raise ModelLoadError(f"model '{model}' has no pretrained tag '{pretrained}' (known: {', '.join(tags)})")
    torch.manual_seed(seed)
    offline = bool(pretrained) and not Path(pretrained).exists() and not _hub_reachable()
    try:
        with _hub_offline(offline):
            return open_clip.create_model(
                model, pretrained=pretrained or None, force_quick_gelu=(pretrained == "openai"), device="cpu"
            )
    except Exception as exc:
        if not pretrained:
            raise ModelLoadError(f"could not build model '{model}': {exc}") from exc
        raise ModelLoadError(
            f"could not get the '{pretrained}' weights of {model} ({type(exc).__name__}; offline?). "
            f"Supply weights with --checkpoint FILE (OpenAI ViT-B-16.pt, or an open_clip .bin/.safetensors "
            f"with --model), or try the offline demo with --model {', '.join(builtin_models()) or 'shapes-demo'}"
        ) from exc


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick probe, so that an offline machine fails in seconds instead of minutes of retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Force huggingface_hub to use only its local cache while `offline`."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _builtin_architecture(name: str) -> torch.nn.Module:
    """A built-in model's network with fresh weights, for a checkpoint of it (`--model shapes-demo
    --checkpoint FILE`: weights retrained by benchmarks/train_demo_clip.py)."""
    import open_clip

    open_clip.add_model_config(WEIGHTS_DIR / f"{name}.json")
    return open_clip.create_model(name, pretrained=None, device="cpu")


def _load_builtin(name: str) -> torch.nn.Module:
    import open_clip

    config = WEIGHTS_DIR / f"{name}.json"
    open_clip.add_model_config(config)
    # open_clip loads the weights file itself (strictly): built without weights and loaded here, it
    # would first warn on the root logger that the model was "initialized randomly"
    return open_clip.create_model(name, pretrained=str(WEIGHTS_DIR / f"{name}.safetensors"), device="cpu")
