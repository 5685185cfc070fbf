"""tagclip-cli: training-free multi-label tags (TagCLIP) and masks (CLS-SEG) from a frozen CLIP.

The Python API (docs/api.md)::

    import tagclip_cli as tc

    model = tc.load_model("shapes-demo")                  # or "ViT-B-16", checkpoint=...
    vocab = tc.vocabulary("voc")                          # a name, a file or a list of names
    tags = model.tag(images, vocab)                       # paths, PIL images or arrays
    masks = model.segment(images, vocab)                  # label maps, per-class masks, scores
    tc.annotate("photos/", "voc", "tags.parquet")         # the commands, with their files

Names are imported on first use, so that `import tagclip_cli` (and the command line) stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["ImageMasks", "ImageTags", "Model", "__version__", "annotate", "commands", "load_model", "merge",
           "segment", "vocabulary"]

# name -> the module that defines it. No module of the package may have one of these names: importing
# it would replace the package attribute (tests/test_api.py checks).
_LAZY = {
    "load_model": "tagclip_cli.api",
    "Model": "tagclip_cli.api",
    "ImageTags": "tagclip_cli.api",
    "ImageMasks": "tagclip_cli.api",
    "vocabulary": "tagclip_cli.commands",
    "annotate": "tagclip_cli.commands",
    "segment": "tagclip_cli.commands",
    "merge": "tagclip_cli.commands",
}


def __getattr__(name: str):
    if name == "commands":
        return importlib.import_module("tagclip_cli.commands")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tagclip_cli' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
