"""tagclip-cli: training-free multi-label tags (TagCLIP) and masks (CLS-SEG) from a frozen CLIP."""

__version__ = "0.1.0"
