"""The "segment" entry of the run record for the built-in mask methods, in the layout earlier
versions wrote (one flat dict of CLS-SEG's and MaskCLIP's fields for every method, plus "dense" for
the dense baselines), so that their outputs resume and compare byte for byte."""

from __future__ import annotations

from dataclasses import asdict

from tagclip_cli.methods.clses import ClsSegConfig
from tagclip_cli.methods.maskclip import MaskClipConfig
from tagclip_cli.quirks import Quirks


def legacy_record(method: str, quirks: Quirks, *, clses: ClsSegConfig | None = None, setting: str = "voc",
                  maskclip: MaskClipConfig | None = None, dense: dict | None = None) -> dict:
    """The record of `method`: CLS-SEG's fields from clses (default: its config for setting),
    MaskCLIP's from maskclip (default: its defaults), the quirks flag, and dense when given."""
    cls_seg = clses if clses is not None else ClsSegConfig.for_setting(setting)
    rule = asdict(cls_seg.rule)
    mask = asdict(maskclip if maskclip is not None else MaskClipConfig())
    record = {"method": method, "caa_layers": cls_seg.caa_layers, "box_threshold": cls_seg.box_threshold,
              "sinkhorn_rounds": cls_seg.sinkhorn_rounds, "affinity_power": cls_seg.affinity_power}
    record.update({key: rule[key] for key in ("background_power", "normalise_after_resize", "cam_eps")})
    record.update(cam_batch=cls_seg.cam_batch, crf=cls_seg.crf)
    record.update({key: value for key, value in rule.items() if key.startswith("crf_")})
    record.update({key: mask[key] for key in ("key_smoothing", "key_smoothing_threshold", "prompt_denoising",
                                              "prompt_denoising_threshold")})
    record["reference_compat"] = quirks.reference_compat
    if dense is not None:
        record["dense"] = dense
    record.update(label_background=rule["label_background"], cam_background=cls_seg.cam_background,
                  save_cams=cls_seg.save_cams)
    return record
