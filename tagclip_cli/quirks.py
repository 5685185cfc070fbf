"""The reference implementation's quirks (docs/algorithm.md §10) as one object that every method reads.

`Quirks()` fixes them all (the default); `Quirks.reference()` (CLI `--reference-compat`) reproduces
them all, so that a caller cannot get some of them without the others (Q1 lives in the dense
forward that TagCLIP and CLS-SEG share, Q2 in the boxes of DMAR, CWR and CAA, Q3 in CWR, Q4 in CAA,
Q6-Q8 in ResCLIP, Q9 in SC-CLIP; Q5 was decided to be no defect: PIAA's refinement drops a group of
one patch in both modes, docs/algorithm.md §10).
Code that branches on one reads its property, named after the quirk, and cites it.
"""

from __future__ import annotations

from dataclasses import dataclass


def _all_or_none(doc: str) -> property:
    """A quirk's flag: on exactly when reference_compat is."""
    return property(lambda self: self.reference_compat, doc=doc)


@dataclass(frozen=True)
class Quirks:
    """All quirks on (reference_compat=True) or all off (the default)."""

    reference_compat: bool = False

    @classmethod
    def reference(cls) -> Quirks:
        """Quirks Q1..Q9 reproduced, as `--reference-compat`."""
        return cls(reference_compat=True)

    # The quirks, each read under its own name (code that branches on one cites it).
    q1_fp16_positions = _all_or_none("Q1: the interpolated positional embedding rounded through fp16.")
    q2_clamp_box_ends = _all_or_none("Q2: a box's right/bottom ends clamped to grid_size - 1 (exclusive).")
    q3_stop_cwr_at_empty_box = _all_or_none("Q3: CWR stops for the rest of the image at the first empty box.")
    q4_caa_float32 = _all_or_none("Q4: CAA's refinement in float32 in the reference's order.")
    q6_sfr_float16 = _all_or_none("Q6: ResCLIP's SFR matrix rounded through fp16.")
    q7_sfr_partial_paths = _all_or_none("Q7: ResCLIP's same-label path check samples the first steps / max_steps "
                                        "of a line only.")
    q8_resclip_switches_on = _all_or_none("Q8: ResCLIP's RCS and SFR switches cannot be turned off.")
    q9_scclip_outlier_rows = _all_or_none("Q9: SC-CLIP's outlier positions split with the grid's height as the "
                                          "row length.")
