"""Radiomics and pixel features of candidate patches, on synthetic HU patches (no Spark)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from ctlake.core.nodule3d import NAMES_3D
from ctlake.core.radiomics import (
    FEATURE_NAMES,
    patch_features,
    pixel_names,
    pixel_vector,
    segment_nodule,
)
from ctlake.errors import ConfigError, InputError

PX = 32
LUNG_HU = -850
ROWS, COLS = np.mgrid[:PX, :PX]


def _disc(radius: float, row: float = PX // 2, col: float = PX // 2) -> np.ndarray:
    return (ROWS - row) ** 2 + (COLS - col) ** 2 <= radius ** 2


def _lung(channels: int = 1, noise_hu: float = 0.0, seed: int = 0) -> np.ndarray:
    patch = np.full((channels, PX, PX), float(LUNG_HU))
    patch += np.random.default_rng(seed).normal(0.0, noise_hu, patch.shape)
    return np.round(patch).astype(np.int16)


def _with(patch: np.ndarray, region: np.ndarray, hu: float, channel: int | None = None,
          noise_hu: float = 0.0, seed: int = 1) -> np.ndarray:
    patch = patch.copy()
    channel = patch.shape[0] // 2 if channel is None else channel
    values = hu + np.random.default_rng(seed).normal(0.0, noise_hu, int(region.sum()))
    patch[channel][region] = np.round(values).astype(np.int16)
    return patch


def _features(patch: np.ndarray, spacing_mm: float = 1.0, slice_spacing_mm: float | None = None) -> dict:
    vector = patch_features(patch, spacing_mm, slice_spacing_mm)
    assert vector.dtype == np.float64 and vector.shape == (len(FEATURE_NAMES),)
    assert np.all(np.isfinite(vector))
    return dict(zip(FEATURE_NAMES, vector))


def _star(outer: float, inner: float, points: int = 8) -> np.ndarray:
    angles = np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    polygon = np.stack([PX // 2 + radii * np.cos(angles), PX // 2 + radii * np.sin(angles)], axis=1)
    image = np.zeros((PX, PX), dtype=np.uint8)
    cv2.fillPoly(image, [np.round(polygon).astype(np.int32)], 1)
    return image.astype(bool)


# ---------------------------------------------------------------------------
# Names.

def test_feature_names_are_unique_and_grouped_in_documented_order():
    assert len(FEATURE_NAMES) == 60 == len(set(FEATURE_NAMES))
    assert FEATURE_NAMES[:3] == ("seg_found", "fo_mean_hu", "fo_std_hu")
    assert FEATURE_NAMES.index("fo_entropy") < FEATURE_NAMES.index("shape_area_mm2")
    assert FEATURE_NAMES[FEATURE_NAMES.index("glcm_contrast_d1"):][:5] == (
        "glcm_contrast_d1", "glcm_homogeneity_d1", "glcm_energy_d1", "glcm_correlation_d1", "glcm_contrast_d2")
    assert FEATURE_NAMES[-31:-21] == tuple(f"lbp_hist_{k:02d}" for k in range(10))
    assert FEATURE_NAMES[-21:] == NAMES_3D


def test_pixel_names_row_major_and_zero_padded():
    assert pixel_names(16)[:2] == ("px_000", "px_001") and pixel_names(16)[-1] == "px_255"
    assert len(pixel_names(16)) == 256
    assert pixel_names(32)[0] == "px_0000" and pixel_names(32)[-1] == "px_1023"


# ---------------------------------------------------------------------------
# Segmentation.

def test_segment_isolated_disc_exactly_in_every_channel_it_appears():
    patch = _with(_with(_lung(3, noise_hu=20.0), _disc(6), 40.0), _disc(3), 40.0, channel=0)
    mask = segment_nodule(patch)
    assert mask.dtype == np.uint8 and mask.shape == (3, PX, PX)
    np.testing.assert_array_equal(mask[1], _disc(6))
    np.testing.assert_array_equal(mask[0], _disc(3))
    assert not mask[2].any()


def test_segment_ground_glass_with_default_threshold_only():
    patch = _with(_lung(), _disc(5), -450.0)
    np.testing.assert_array_equal(segment_nodule(patch)[0], _disc(5))
    assert not segment_nodule(patch, threshold_hu=-400.0).any()


def test_segment_seeds_from_nearest_component_when_centre_is_air():
    near = _disc(1.5, col=PX // 2 + 3)
    patch = _with(_lung(), near, 40.0)
    np.testing.assert_array_equal(segment_nodule(patch)[0], near)
    # Nearest pixel 5 px from the centre: beyond the seed radius.
    assert not segment_nodule(_with(_lung(), _disc(1.5, col=PX // 2 + 6), 40.0)).any()


def test_juxtapleural_nodule_touching_the_wall_keeps_almost_none_of_the_wall():
    wall = COLS < 10
    patch = _with(_with(_lung(), wall, 40.0), _disc(6), 40.0)
    mask = segment_nodule(patch)[0].astype(bool)
    assert mask[_disc(6)].all()
    # A few wall pixels around the contact, out of 320.
    assert (mask & wall).sum() <= 5


@pytest.mark.parametrize("nodule_col", [PX // 2 - 2, PX // 2 - 4])
def test_juxtapleural_nodule_merged_into_the_wall_keeps_a_sliver_of_it(nodule_col):
    # The nodule overlaps the 10 px wall by 2 or 4 columns: no erosion up to 3 px
    # separates them, and the candidate is 2 or 4 px off the nodule's centre.
    wall = COLS < 10
    nodule = _disc(6, col=nodule_col)
    patch = _with(_with(_lung(), wall, 40.0), nodule, 40.0)
    mask = segment_nodule(patch)[0].astype(bool)
    assert mask[nodule].mean() > 0.9
    assert (mask & wall & ~nodule).sum() < 20


def test_vessel_attached_to_nodule_is_cut_near_the_nodule():
    vessel = (np.abs(ROWS - PX // 2) <= 1) & (COLS >= PX // 2)
    patch = _with(_with(_lung(), vessel, 40.0), _disc(5), 40.0)
    mask = segment_nodule(patch)[0].astype(bool)
    assert mask[_disc(5)].all()
    # A stub of the 3 px wide vessel, 3 px long, instead of its 38 px.
    assert 0 < (mask & ~_disc(5)).sum() <= 3 * 3


def test_segmentation_never_leaves_the_limit_disc():
    # A mass filling the patch: everything inside the limit disc, nothing outside.
    patch = _with(_lung(), np.ones((PX, PX), dtype=bool), 40.0)
    mask = segment_nodule(patch, max_radius_frac=0.25)[0].astype(bool)
    np.testing.assert_array_equal(mask, _disc(0.25 * PX))


# ---------------------------------------------------------------------------
# First-order and shape features.

@pytest.mark.parametrize("spacing_mm", [1.0, 0.5])
def test_disc_shape_close_to_analytic_values(spacing_mm):
    radius_px = 6
    features = _features(_with(_lung(noise_hu=20.0), _disc(radius_px), 40.0, noise_hu=10.0), spacing_mm)
    radius_mm = radius_px * spacing_mm
    assert features["seg_found"] == 1.0
    assert features["shape_area_mm2"] == pytest.approx(math.pi * radius_mm ** 2, rel=0.03)
    assert features["shape_perimeter_mm"] == pytest.approx(2 * math.pi * radius_mm, rel=0.06)
    assert features["shape_equiv_diameter_mm"] == pytest.approx(2 * radius_mm, rel=0.02)
    assert 0.85 <= features["shape_compactness"] <= 1.0
    assert features["shape_eccentricity"] == pytest.approx(0.0, abs=1e-9)
    assert features["shape_solidity"] == pytest.approx(1.0)
    assert features["n3d_z_extent_mm"] == spacing_mm
    assert features["n3d_volume_mm3"] == pytest.approx(features["shape_area_mm2"] * spacing_mm)


def test_ellipse_is_more_eccentric_than_disc():
    ellipse = np.zeros((PX, PX), dtype=np.uint8)
    cv2.ellipse(ellipse, (PX // 2, PX // 2), (10, 4), 30.0, 0.0, 360.0, 1, -1)
    features = _features(_with(_lung(), ellipse.astype(bool), 40.0))
    # Semi-axes 10 and 4: sqrt(1 - (4/10)**2) = 0.917.
    assert features["shape_eccentricity"] == pytest.approx(math.sqrt(1 - 0.16), abs=0.03)


def test_spiculated_star_less_solid_and_compact_than_disc_of_same_area():
    star = _star(outer=12.0, inner=4.0)
    disc = _disc(math.sqrt(star.sum() / math.pi))
    star_features = _features(_with(_lung(), star, 40.0))
    disc_features = _features(_with(_lung(), disc, 40.0))
    assert star_features["shape_area_mm2"] == pytest.approx(disc_features["shape_area_mm2"], rel=0.1)
    assert star_features["shape_solidity"] < 0.8
    assert disc_features["shape_solidity"] > 0.99
    assert star_features["shape_compactness"] < 0.5 * disc_features["shape_compactness"]


def test_first_order_of_noisy_solid_disc_matches_its_pixels():
    patch = _with(_lung(noise_hu=20.0), _disc(6), 40.0, noise_hu=30.0)
    values = patch[0][_disc(6)].astype(float)
    features = _features(patch)
    assert features["fo_mean_hu"] == pytest.approx(40.0, abs=6.0)
    assert features["fo_mean_hu"] == pytest.approx(values.mean())
    assert features["fo_std_hu"] == pytest.approx(values.std())
    z = (values - values.mean()) / values.std()
    assert features["fo_skewness"] == pytest.approx(np.mean(z ** 3))
    assert features["fo_kurtosis"] == pytest.approx(np.mean(z ** 4) - 3.0)
    assert [features[f"fo_p{q}_hu"] for q in (10, 25, 50, 75, 90)] == pytest.approx(
        np.percentile(values, [10, 25, 50, 75, 90]))
    counts, _ = np.histogram(values, bins=80, range=(-1000.0, 1000.0))
    p = counts[counts > 0] / counts.sum()
    assert features["fo_entropy"] == pytest.approx(-np.sum(p * np.log2(p)))
    # A normal of sd 30 HU in 25 HU bins: about log2(30 / 25 * sqrt(2 pi e)) = 2.3 bits.
    assert features["fo_entropy"] == pytest.approx(2.3, abs=0.4)


def test_constant_region_has_zero_moments_and_entropy():
    features = _features(_with(_lung(), _disc(6), 40.0))
    assert (features["fo_mean_hu"], features["fo_std_hu"], features["fo_skewness"], features["fo_kurtosis"],
            features["fo_p10_hu"], features["fo_p90_hu"], features["fo_entropy"]) == (40.0, 0.0, 0.0, 0.0,
                                                                                    40.0, 40.0, 0.0)


def test_calcified_disc_is_denser_than_solid_disc():
    solid = _features(_with(_lung(noise_hu=20.0), _disc(5), 40.0, noise_hu=10.0))
    calcified = _features(_with(_lung(noise_hu=20.0), _disc(5), 600.0, noise_hu=50.0))
    assert calcified["fo_mean_hu"] > solid["fo_mean_hu"] + 400.0
    assert calcified["fo_p90_hu"] > solid["fo_p90_hu"] + 400.0


def test_3d_extent_and_volume_follow_the_nodule_through_the_channels():
    patch = _with(_with(_lung(3), _disc(6), 40.0), _disc(4), 40.0, channel=0)
    features = _features(patch, spacing_mm=0.5, slice_spacing_mm=2.5)
    assert features["n3d_z_extent_mm"] == 5.0
    voxels = _disc(6).sum() + _disc(4).sum()
    assert features["n3d_volume_mm3"] == pytest.approx(voxels * 0.25 * 2.5)
    assert _features(patch, spacing_mm=0.5)["n3d_volume_mm3"] == pytest.approx(voxels * 0.25 * 0.5)


# ---------------------------------------------------------------------------
# Texture.

def test_glcm_of_constant_patch():
    features = _features(_lung())
    for d in (1, 2, 4):
        assert features[f"glcm_contrast_d{d}"] == 0.0
        assert features[f"glcm_homogeneity_d{d}"] == 1.0
        assert features[f"glcm_energy_d{d}"] == 1.0
        assert features[f"glcm_correlation_d{d}"] == 1.0


def test_glcm_of_checkerboard():
    # -1000 HU -> level 0, 400 HU -> level 31; horizontal and vertical pairs differ by 31,
    # diagonal pairs and every pair at distance 2 are equal.
    checkerboard = np.where((ROWS + COLS) % 2 == 0, -1000, 400).astype(np.int16)[None]
    features = _features(checkerboard)
    assert features["glcm_contrast_d1"] == pytest.approx((2 * 31 ** 2 + 2 * 0) / 4)
    assert features["glcm_correlation_d1"] == pytest.approx(0.0, abs=1e-12)
    assert features["glcm_contrast_d2"] == 0.0
    assert features["glcm_energy_d2"] == pytest.approx(math.sqrt(0.5))


def _reference_glcm_properties(levels: np.ndarray, distance: int) -> list[float]:
    """Textbook GLCM by explicit loops: symmetric, normalized, properties averaged over 4 angles."""
    properties = []
    for dr, dc in ((0, distance), (-distance, distance), (-distance, 0), (-distance, -distance)):
        matrix = np.zeros((32, 32))
        for r in range(levels.shape[0]):
            for c in range(levels.shape[1]):
                if 0 <= r + dr < levels.shape[0] and 0 <= c + dc < levels.shape[1]:
                    matrix[levels[r, c], levels[r + dr, c + dc]] += 1
                    matrix[levels[r + dr, c + dc], levels[r, c]] += 1
        matrix /= matrix.sum()
        i, j = np.indices(matrix.shape)
        mean = np.sum(i * matrix)
        sd = math.sqrt(np.sum((i - mean) ** 2 * matrix))
        properties.append([np.sum(matrix * (i - j) ** 2), np.sum(matrix / (1 + (i - j) ** 2)),
                           math.sqrt(np.sum(matrix ** 2)), np.sum((i - mean) * (j - mean) * matrix) / sd ** 2])
    return list(np.mean(properties, axis=0))


def test_glcm_matches_textbook_definition():
    # Levels are 43.75 HU wide from -1000 HU: level k is centred on -1000 + 43.75 (k + 0.5).
    levels = np.random.default_rng(5).integers(0, 32, (PX, PX))
    patch = np.round(-1000.0 + 43.75 * (levels + 0.5)).astype(np.int16)[None]
    features = _features(patch)
    for d in (1, 2, 4):
        names = [f"glcm_{prop}_d{d}" for prop in ("contrast", "homogeneity", "energy", "correlation")]
        assert [features[name] for name in names] == pytest.approx(_reference_glcm_properties(levels, d))


def test_lbp_histogram_of_constant_patch_and_single_bright_pixel():
    lbp = [f"lbp_hist_{k:02d}" for k in range(10)]
    constant = _features(_lung())
    assert [constant[name] for name in lbp] == [0.0] * 8 + [1.0, 0.0]
    spot = _features(_with(_lung(), _disc(0), 40.0))
    # The bright pixel sees 8 darker neighbours: 0 ones.  Every other pixel sees equal or
    # brighter (interpolated) neighbours, and equal counts as 1: 8 ones.
    interior = (PX - 2) ** 2
    assert [spot[name] for name in lbp] == pytest.approx([1 / interior] + [0.0] * 7 + [1 - 1 / interior, 0.0])


def test_lbp_histogram_is_rotation_invariant_and_sums_to_one():
    patch = np.random.default_rng(3).normal(-500.0, 300.0, (1, PX, PX))
    features = patch_features(patch, 1.0)
    rotated = patch_features(np.rot90(patch, axes=(1, 2)).copy(), 1.0)
    lbp = slice(FEATURE_NAMES.index("lbp_hist_00"), FEATURE_NAMES.index("lbp_hist_09") + 1)
    assert features[lbp].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(rotated[lbp], features[lbp], atol=1e-12)


# ---------------------------------------------------------------------------
# Degenerate patches: finite values, documented conventions.

def test_empty_lung_patch_falls_back_to_central_disc():
    features = _features(_lung(3, noise_hu=20.0))
    assert features["seg_found"] == 0.0
    assert features["fo_mean_hu"] == pytest.approx(LUNG_HU, abs=10.0)
    assert all(features[name] == 0.0 for name in FEATURE_NAMES if name.startswith("shape_"))


def test_single_pixel_and_line_masks_follow_the_conventions():
    pixel = _features(_with(_lung(), _disc(0), 40.0))
    assert (pixel["shape_area_mm2"], pixel["shape_perimeter_mm"], pixel["shape_eccentricity"],
            pixel["shape_compactness"], pixel["shape_solidity"]) == (1.0, 0.0, 0.0, 1.0, 1.0)
    line = _features(_with(_lung(), (ROWS == PX // 2) & (np.abs(COLS - PX // 2) <= 5), 40.0))
    assert line["shape_area_mm2"] == 11.0 and line["shape_solidity"] == 1.0
    assert line["shape_eccentricity"] == pytest.approx(1.0)


def test_nodule_only_in_a_neighbouring_slice_counts_in_3d_not_in_the_centre():
    features = _features(_with(_lung(3), _disc(4), 40.0, channel=2))
    assert features["seg_found"] == 0.0 and features["shape_area_mm2"] == 0.0
    assert features["n3d_z_extent_mm"] == 1.0 and features["n3d_volume_mm3"] == _disc(4).sum()


def test_air_padding_patch_is_finite_and_empty():
    features = _features(np.full((3, PX, PX), -1000, dtype=np.int16))
    assert features["seg_found"] == 0.0 and features["fo_mean_hu"] == -1000.0
    assert features["glcm_correlation_d1"] == 1.0


def test_border_patch_with_padded_air_segments_the_nodule_only():
    patch = _with(_lung(3, noise_hu=20.0), _disc(4), 40.0)
    patch[:, :, PX // 2 + 6:] = -1000
    features = _features(patch)
    assert features["shape_area_mm2"] == _disc(4).sum()


def _same_values_other_layouts(patch: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays equal to ``patch`` element for element, laid out or typed differently."""
    strided = np.zeros((patch.shape[0], 2 * PX, 2 * PX), dtype=patch.dtype)
    strided[:, ::2, ::2] = patch
    transposed = np.ascontiguousarray(patch.transpose(0, 2, 1)).transpose(0, 2, 1)
    layouts = {
        # What the UDF hands over: a read-only view of the row's bytes.
        "read-only bytes": np.frombuffer(patch.astype("<i2").tobytes(), "<i2").reshape(patch.shape),
        "Fortran order": np.asfortranarray(patch),
        "strided view": strided[:, ::2, ::2],
        "transposed view": transposed,
        "channels reversed twice": patch[::-1].copy()[::-1],
        "big-endian int16": patch.astype(">i2"),
        "int32": patch.astype(np.int32),
        "float32": patch.astype(np.float32),
        "float64": patch.astype(np.float64),
    }
    for name, other in layouts.items():
        assert np.array_equal(other, patch), name
    assert not layouts["strided view"].flags.c_contiguous and not layouts["transposed view"].flags.c_contiguous
    assert not layouts["read-only bytes"].flags.writeable
    return layouts


def test_memory_layout_and_dtype_do_not_change_the_features():
    """The UDF hands over read-only int16 views of Arrow bytes: the figures must not depend on that."""
    star = _star(10.0, 4.0)
    patch = _with(_with(_lung(3, noise_hu=20.0), star, 40.0, noise_hu=10.0), _disc(5), 40.0, channel=0)
    assert patch.dtype == np.int16 and patch.flags.c_contiguous
    reference = _features(patch, 0.8, 1.25)
    # Not a degenerate vector: the star is found whole, in the centre and the channel below.
    assert reference["seg_found"] == 1.0
    assert reference["shape_area_mm2"] == pytest.approx(star.sum() * 0.64)
    assert reference["n3d_z_extent_mm"] == 2.5
    expected = np.array(list(reference.values()))
    pixels = pixel_vector(patch)
    for name, other in _same_values_other_layouts(patch).items():
        np.testing.assert_array_equal(patch_features(other, 0.8, 1.25), expected, err_msg=name)
        np.testing.assert_array_equal(pixel_vector(other), pixels, err_msg=name)
        np.testing.assert_array_equal(segment_nodule(other), segment_nodule(patch), err_msg=name)


def test_features_tell_apart_patches_that_differ():
    """The other side of the invariance above: a change that matters does change the vector."""
    patch = _with(_lung(3, noise_hu=20.0), _disc(5), 40.0, noise_hu=10.0)
    reference = _features(patch)
    # 100 HU more inside the nodule, in every channel: the same region, 100 HU denser.
    denser = _features(patch + np.where(_disc(5), 100, 0).astype(np.int16))
    assert denser["fo_mean_hu"] == pytest.approx(reference["fo_mean_hu"] + 100.0)
    assert denser["fo_std_hu"] == pytest.approx(reference["fo_std_hu"])
    assert denser["shape_area_mm2"] == reference["shape_area_mm2"] == _disc(5).sum()
    assert denser["n3d_mean_hu"] == pytest.approx(reference["n3d_mean_hu"] + 100.0)
    assert _features(patch, 0.5)["shape_area_mm2"] == pytest.approx(reference["shape_area_mm2"] / 4)


# ---------------------------------------------------------------------------
# Pixel baseline.

def test_pixel_vector_window_and_area_resize():
    patch = np.where(COLS < PX // 2, -2000, 1000).astype(np.int16)[None]
    vector = pixel_vector(patch, size=16)
    assert vector.dtype == np.float32 and vector.shape == (256,)
    image = vector.reshape(16, 16)
    assert np.all(image[:, :8] == 0.0) and np.all(image[:, 8:] == 1.0)
    # 2x2 areas average: -300 HU is half-way through -1000..400.
    assert np.all(pixel_vector(np.full((1, PX, PX), -300, dtype=np.int16), size=8) == pytest.approx(0.5))


def test_pixel_vector_uses_the_centre_channel():
    patch = np.full((3, PX, PX), -1000, dtype=np.int16)
    patch[1] = 400
    vector = pixel_vector(patch, size=4)
    assert vector.shape == (16,) and np.all(vector == 1.0)


# ---------------------------------------------------------------------------
# Edges.

@pytest.mark.parametrize("patch", [np.zeros((PX, PX), np.int16), np.zeros((2, PX, PX), np.int16),
                                   np.zeros((1, PX, PX - 1), np.int16), np.full((1, 8, 8), np.nan)])
def test_malformed_patches_raise_input_error(patch):
    with pytest.raises(InputError):
        patch_features(patch, 1.0)


def test_bad_spacing_and_parameters_raise_named_errors():
    patch = _lung()
    with pytest.raises(InputError, match="spacing_mm"):
        patch_features(patch, 0.0)
    with pytest.raises(InputError, match="slice_spacing_mm"):
        patch_features(patch, 1.0, -1.0)
    with pytest.raises(InputError, match="at least 5 px"):
        patch_features(np.zeros((1, 4, 4), np.int16), 1.0)
    with pytest.raises(ConfigError, match="max_radius_frac"):
        segment_nodule(patch, max_radius_frac=0.0)
    with pytest.raises(ConfigError, match="hu_max"):
        pixel_vector(patch, hu_min=400.0, hu_max=-1000.0)
    with pytest.raises(ConfigError, match="size"):
        pixel_vector(patch, size=0)
