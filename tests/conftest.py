"""Shared fixtures: tiny seeded random CLIPs (OpenAI key layout) and sample photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def make_tiny_clip(seed: int = 0, layers: int = 6, width: int = 64, patch: int = 16, image: int = 224):
    """A randomly initialised open_clip CLIP, QuickGELU, 64-wide heads (OpenAI-inferable layout)."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=layers, width=width, head_width=64, patch_size=patch,
                                           image_size=image)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    return model.eval()


def kill_after_first_part(args: list[str], env: dict, parts: Path, timeout: float = 300,
                          pattern: str = "part-*.parquet") -> int:
    """Start `python -m tagclip_cli ARGS`, SIGKILL it as soon as its first part file (a file
    matching `pattern`) exists in `parts`, and return its exit status (the caller checks it is
    -SIGKILL)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tagclip_cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not list(parts.glob(pattern)):
            assert proc.poll() is None, "the run ended before writing a part"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random CLIP saved as an OpenAI-layout state dict (.pt)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-clip.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_backbone(tiny_checkpoint, cache_dir):
    from tagclip_cli.backbone import load_backbone

    return load_backbone(checkpoint=tiny_checkpoint, cache_dir=cache_dir)


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image (RGB uint8 arrays)."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, arr in sample_photos().items():
        Image.fromarray(arr).save(root / f"{name}.jpg", quality=92)
    return root


def pytest_collection_modifyitems(config, items):
    """Deselect the `cuda` tests (tests/test_cuda.py) where torch sees no CUDA device: CI has no
    GPU. Deselected, not skipped: they are reported as deselected and never count as passing."""
    import torch

    if torch.cuda.is_available():
        return
    cuda = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda:
        config.hook.pytest_deselected(items=cuda)
        items[:] = [item for item in items if item.get_closest_marker("cuda") is None]


@pytest.fixture(autouse=True)
def _pil_open_restored():
    """Ultralytics (imported by the export tests to check YOLO datasets) replaces PIL.Image.open
    process-wide on import; put it back after each test so no later test decodes through it."""
    original = Image.open
    yield
    Image.open = original
