"""Series layout along the slice normal and the ``series`` row (pure, no Spark)."""
import pandas as pd
import pytest

from ctlake.core.series_layout import series_row, summarize_series


def test_uniform_series_in_any_order():
    layout = summarize_series([5.0, -5.0, 0.0, 2.5, -2.5])
    assert layout == {"slice_count": 5, "z_min": -5.0, "z_max": 5.0, "spacing_mm": 2.5, "spacing_uniform": True,
                      "duplicate_positions": 0, "gaps": 0, "complete": True}


def test_a_missing_slice_is_a_gap_and_a_repeated_position_a_duplicate():
    layout = summarize_series([0.0, 1.0, 2.0, 4.0, 4.0, 5.0])
    assert (layout["spacing_mm"], layout["gaps"], layout["duplicate_positions"]) == (1.0, 1, 1)
    assert not layout["spacing_uniform"] and not layout["complete"]


def test_scanner_rounding_is_not_a_gap():
    layout = summarize_series([0.0, 1.25, 2.49, 3.76, 5.0])
    assert layout["spacing_uniform"] and layout["complete"] and layout["spacing_mm"] == pytest.approx(1.255, abs=0.01)


def test_single_slice_and_empty_series():
    assert summarize_series([3.0])["complete"] and summarize_series([3.0])["spacing_mm"] is None
    assert summarize_series([]) == {"slice_count": 0, "z_min": None, "z_max": None, "spacing_mm": None,
                                    "spacing_uniform": True, "duplicate_positions": 0, "gaps": 0, "complete": False}


def slices(**changes):
    frame = pd.DataFrame({
        "series_uid": ["1.2"] * 3, "study_uid": ["1.1"] * 3, "patient_pseudonym": ["p-ab"] * 3,
        "modality": ["CT"] * 3, "manufacturer": [None] * 3, "z_position": [2.0, 0.0, 1.0],
        "rows": [512] * 3, "columns": [512] * 3, "pixel_spacing_row": [0.7] * 3, "pixel_spacing_col": [0.7] * 3,
        "slice_thickness": [float("nan")] * 3, "orientation": ["1,0,0,0,1,0"] * 3})
    for column, values in changes.items():
        frame[column] = values
    return frame


def test_series_row_from_its_slices():
    assert series_row(slices()) == {
        "series_uid": "1.2", "study_uid": "1.1", "patient_pseudonym": "p-ab", "modality": "CT", "manufacturer": None,
        "slice_count": 3, "z_min": 0.0, "z_max": 2.0, "spacing_mm": 1.0, "spacing_uniform": True,
        "duplicate_positions": 0, "gaps": 0, "complete": True, "consistent_geometry": True,
        "rows": 512, "columns": 512, "pixel_spacing_row": 0.7, "pixel_spacing_col": 0.7, "slice_thickness": None}


@pytest.mark.parametrize("column, values", [("rows", [512, 512, 256]), ("pixel_spacing_col", [0.7, 0.7, 0.8]),
                                            ("orientation", ["1,0,0,0,1,0"] * 2 + ["0,1,0,1,0,0"])])
def test_one_differing_slice_makes_the_geometry_inconsistent(column, values):
    assert series_row(slices(**{column: values}))["consistent_geometry"] is False
