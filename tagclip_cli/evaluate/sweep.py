"""`evaluate --cams DIR`: label maps remade from the cams `segment --save-cams DIR` saved, one per
background threshold of a sweep (CLIP-ES's eval_cam.py protocol), optionally through the dense CRF.

The label rule and the CRF are `tagclip_cli.cams`, the very functions segment used, so the sweep at
the run's own rule (no --bg-threshold, or 0.5 for the default power-1 background) gives that run's
masks exactly. No model is loaded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tagclip_cli.cams import (
    CamRule,
    crf_label_map,
    crf_label_map_upsampled,
    label_map_from_cams,
    label_map_from_upsampled,
    require_crf,
)
from tagclip_cli.errors import UsageError
from tagclip_cli.evaluate.predictions import MaskPredictions
from tagclip_cli.formats import FormatError, read_cam_file, read_cams_index


class CamPredictions(MaskPredictions):
    """A --save-cams directory as segmentation predictions: `variants` are the background
    thresholds swept (None = the rule of the run that saved them, in cams.json)."""

    def __init__(
        self, directory: Path, thresholds: Sequence[float] | None = None, crf: bool = False,
        images: Path | None = None,
    ) -> None:
        index = read_cams_index(directory)
        self.source = Path(directory)
        self.classes = tuple(str(c) for c in index["classes"])
        self.layout = str(index["layout"])
        try:
            self.rule = CamRule(**index["rule"])
        except TypeError as exc:
            raise FormatError(f"{directory}/cams.json: malformed rule ({exc})") from None
        if thresholds is not None and not self.rule.label_background:
            raise UsageError(f"--cams {directory}: these cams have no background label (--setting cocostuff), "
                             "so there is no background threshold to sweep; drop --bg-threshold")
        self.variants: tuple[float | None, ...] = tuple(thresholds) if thresholds is not None else (None,)
        self.crf = crf
        self.images = images
        if crf:
            require_crf()
        paths = sorted(self.source.rglob("*.npz"))
        if not paths:
            raise FormatError(f"--cams {directory}: no .npz cam files (segment --save-cams writes DIR/<image id>.npz)")
        self.entries = [((p.relative_to(self.source).as_posix(),), p) for p in paths]

    def describe(self, variant: float | None) -> str:
        """How the background of one variant is scored (for the report)."""
        if not self.rule.label_background:
            return "no background label (argmax over the tags)"
        if variant is None:
            return f"(1 - max cam) ** {self.rule.background_power:g} (the run's own rule)"
        return f"constant {variant:g}"

    def _rgb(self, path: Path, image_id: str, stored: str, size: tuple[int, int]) -> np.ndarray:
        from tagclip_cli.data import DecodeError, load_rgb

        source = Path(stored) if self.images is None else self.images / image_id
        try:
            rgb = np.asarray(load_rgb(str(source)))
        except (DecodeError, OSError) as exc:
            hint = "" if self.images is not None else " (pass --images DIR if the images moved)"
            raise UsageError(f"{path}: cannot read its image {source} for the CRF ({exc}){hint}") from None
        if rgb.shape[:2] != size:
            raise UsageError(f"{path}: image {source} is {rgb.shape[1]}x{rgb.shape[0]}, the cams were saved "
                             f"for {size[1]}x{size[0]}")
        return rgb

    def load_variants(self, handle: Any, height: int, width: int) -> list[np.ndarray]:
        """One (H, W) int32 label map per variant (0 = background, class c -> c + 1)."""
        saved = read_cam_file(handle, len(self.classes))
        if self.layout == "image" and saved.cams.shape[1:] != saved.size:
            raise FormatError(f"{handle}: cams {saved.cams.shape[1:]} but image size {saved.size} (layout image)")
        cams = torch.from_numpy(saved.cams.astype(np.float32))  # float16 -> float32 is exact, as segment's
        labels = [int(t) + 1 for t in saved.tags]
        rule = self.rule
        rgb = self._rgb(handle, saved.image_id, saved.path, saved.size) if self.crf else None
        maps = []
        for threshold in self.variants:
            if self.layout == "grid":
                if rgb is not None:
                    label_map, _ = crf_label_map(rgb, cams, labels, rule, threshold)
                else:
                    label_map, _ = label_map_from_cams(cams, labels, saved.size, rule.background_power,
                                                       rule.normalise_after_resize, rule.cam_eps,
                                                       rule.label_background, threshold)
            elif rgb is not None:
                label_map, _ = crf_label_map_upsampled(rgb, cams, labels, rule, threshold)
            else:
                label_map, _ = label_map_from_upsampled(cams, labels, rule.background_power, rule.label_background,
                                                        threshold)
            maps.append(label_map)
        return maps

    def load(self, handle: Any, height: int, width: int) -> np.ndarray:
        return self.load_variants(handle, height, width)[0]
