"""Series geometry from slice positions: spacing, uniformity, gaps and duplicates (mm)."""
from __future__ import annotations

import numpy as np
import pandas as pd


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


#: Columns whose values must be one per series for its geometry to be consistent.
GEOMETRY_COLUMNS = ("rows", "columns", "pixel_spacing_row", "pixel_spacing_col", "orientation")


def series_row(slices: pd.DataFrame) -> dict:
    """One series' ``series`` row from the metadata of its slices (no pixels).

    ``slices`` has one row per slice with the series' identity columns,
    ``z_position`` (mm), the matrix size, pixel spacing (mm), slice thickness
    and ``orientation`` (the six cosines as one string, so equal orientations
    compare equal). The first slice gives identity and matrix;
    :func:`summarize_series` the layout along the normal.
    """
    first = slices.iloc[0]
    return {
        "series_uid": first["series_uid"], "study_uid": first["study_uid"],
        "patient_pseudonym": first["patient_pseudonym"], "modality": first["modality"],
        "manufacturer": first["manufacturer"], **summarize_series(slices["z_position"].to_numpy()),
        "consistent_geometry": bool(slices[list(GEOMETRY_COLUMNS)].drop_duplicates().shape[0] == 1),
        "rows": int(first["rows"]), "columns": int(first["columns"]),
        "pixel_spacing_row": float(first["pixel_spacing_row"]),
        "pixel_spacing_col": float(first["pixel_spacing_col"]),
        "slice_thickness": None if pd.isna(first["slice_thickness"]) else float(first["slice_thickness"]),
    }
