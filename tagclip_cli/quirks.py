"""The reference implementation's quirks (docs/algorithm.md §10) as one object that every method reads.

`Quirks()` fixes all four (the default); `Quirks.reference()` (CLI `--reference-compat`) reproduces
all four, so that a caller cannot get some of them without the others (Q1 lives in the dense
forward that TagCLIP and CLS-SEG share, Q2 in the boxes of DMAR, CWR and CAA, Q3 in CWR, Q4 in CAA).
Code that branches on one reads its property, named after the quirk, and cites it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quirks:
    """All four quirks on (reference_compat=True) or all off (the default)."""

    reference_compat: bool = False

    @classmethod
    def reference(cls) -> Quirks:
        """Quirks Q1..Q4 reproduced, as `--reference-compat`."""
        return cls(reference_compat=True)

    @property
    def q1_fp16_positions(self) -> bool:
        """Q1: the interpolated positional embedding rounded through fp16."""
        return self.reference_compat

    @property
    def q2_clamp_box_ends(self) -> bool:
        """Q2: a box's right/bottom ends clamped to grid_size - 1 (exclusive)."""
        return self.reference_compat

    @property
    def q3_stop_cwr_at_empty_box(self) -> bool:
        """Q3: CWR stops for the rest of the image at the first empty box."""
        return self.reference_compat

    @property
    def q4_caa_float32(self) -> bool:
        """Q4: CAA's refinement in float32 in the reference's order."""
        return self.reference_compat

    @property
    def q5_sfr_float16(self) -> bool:
        """Q5: ResCLIP's SFR matrix rounded through fp16."""
        return self.reference_compat

    @property
    def q6_sfr_partial_paths(self) -> bool:
        """Q6: ResCLIP's same-label path check samples only the first steps / max_steps of a line."""
        return self.reference_compat

    @property
    def q7_resclip_switches_on(self) -> bool:
        """Q7: ResCLIP's RCS and SFR switches cannot be turned off."""
        return self.reference_compat

    @property
    def q8_scclip_outlier_rows(self) -> bool:
        """Q8: SC-CLIP's outlier positions computed with the grid's height as its row length."""
        return self.reference_compat
