"""Series geometry from slice positions: spacing, uniformity, gaps and duplicates (mm)."""
from __future__ import annotations

import numpy as np


def summarize_series(z_positions, tolerance_mm: float = 0.05, tolerance_fraction: float = 0.02) -> dict:
    """Describe how a series' slices are laid out along the slice normal.

    Parameters
    ----------
    z_positions : array-like of float
        Position of every frame along the slice normal, in mm, any order.
    tolerance_mm, tolerance_fraction : float
        Two spacings are "the same" when they differ by less than the larger
        of ``tolerance_mm`` and ``tolerance_fraction`` of the median spacing;
        scanners round positions, so exact equality would flag every series.

    Returns
    -------
    dict
        ``slice_count``, ``z_min``, ``z_max``, ``spacing_mm`` (median step),
        ``spacing_uniform``, ``duplicate_positions`` (frames sharing a position
        with another), ``gaps`` (steps of 1.5 spacings or more, i.e. missing
        slices) and ``complete`` (no duplicates and no gaps).
    """
    z = np.sort(np.asarray(z_positions, dtype=float))
    count = int(z.size)
    result = {"slice_count": count, "z_min": float(z[0]) if count else None,
              "z_max": float(z[-1]) if count else None, "spacing_mm": None,
              "spacing_uniform": True, "duplicate_positions": 0, "gaps": 0, "complete": count > 0}
    if count < 2:
        return result
    steps = np.diff(z)
    duplicates = steps <= tolerance_mm
    result["duplicate_positions"] = int(duplicates.sum())
    distinct_steps = steps[~duplicates]
    if distinct_steps.size:
        spacing = float(np.median(distinct_steps))
        tolerance = max(tolerance_mm, tolerance_fraction * spacing)
        result["spacing_mm"] = round(spacing, 4)
        result["spacing_uniform"] = bool(np.all(np.abs(distinct_steps - spacing) <= tolerance))
        result["gaps"] = int(np.sum(distinct_steps >= 1.5 * spacing - tolerance))
    result["complete"] = result["duplicate_positions"] == 0 and result["gaps"] == 0
    return result
