"""The nodule as a 3D object: segmentation and figures on synthetic HU volumes (no Spark)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ctlake.core.nodule3d import NAMES_3D, features_3d, segment_nodule_3d
from ctlake.errors import ConfigError, InputError

N = 33
LUNG_HU = -850.0
Z, R, C = np.ogrid[:N, :N, :N]


def _ball(radius: float, centre=(N // 2, N // 2, N // 2), scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    return sum(((g - c) / s) ** 2 for g, c, s in zip((Z, R, C), centre, scale)) <= radius ** 2


def _lung(noise_hu: float = 20.0, seed: int = 0) -> np.ndarray:
    return LUNG_HU + np.random.default_rng(seed).normal(0.0, noise_hu, (N, N, N))


def _with(volume: np.ndarray, mask: np.ndarray, hu: float) -> np.ndarray:
    volume = volume.copy()
    volume[mask] = hu
    return volume


def _named(vector: np.ndarray) -> dict:
    assert vector.shape == (len(NAMES_3D),) and np.all(np.isfinite(vector))
    return dict(zip(NAMES_3D, vector))


def test_ball_figures_match_geometry():
    radius = 6.0
    f = _named(features_3d(_with(_lung(), _ball(radius), 40.0), (1.0, 1.0, 1.0)))
    assert f["n3d_volume_mm3"] == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.05)
    assert f["n3d_equiv_diameter_mm"] == pytest.approx(2 * radius, rel=0.02)
    assert f["n3d_elongation"] == pytest.approx(1.0, abs=0.02) and f["n3d_flatness"] == pytest.approx(1.0, abs=0.02)
    # Voxel faces overstate a ball's surface by about 3/2: the documented staircase bias.
    assert 0.6 <= f["n3d_sphericity"] <= 0.72
    assert f["n3d_solidity"] > 0.9 and f["n3d_min_compactness"] > 0.8
    assert f["n3d_z_extent_mm"] == 2 * radius + 1
    assert f["n3d_mean_hu"] == pytest.approx(40.0) and f["n3d_solid_fraction"] == 1.0
    assert f["n3d_dense_fraction"] == 0.0 and f["n3d_ggo_fraction"] == 0.0
    assert f["n3d_margin_gradient"] > 100.0


def test_spacing_scales_volume_and_extent():
    volume = _with(_lung(), _ball(4.0, scale=(0.5, 1.0, 1.0)), 40.0)
    iso = _named(features_3d(volume, (1.0, 1.0, 1.0)))
    thick = _named(features_3d(volume, (2.0, 1.0, 1.0)))
    assert thick["n3d_volume_mm3"] == pytest.approx(2 * iso["n3d_volume_mm3"])
    assert thick["n3d_z_extent_mm"] == pytest.approx(2 * iso["n3d_z_extent_mm"])
    # Squashed in voxels, round in mm.
    assert iso["n3d_flatness"] < 0.6 and thick["n3d_flatness"] > 0.85


def test_elongated_and_spiculated_shapes_rank_below_a_ball():
    ball = _named(features_3d(_with(_lung(), _ball(5.0), 40.0), (1.0, 1.0, 1.0)))
    cigar = _named(features_3d(_with(_lung(), _ball(3.0, scale=(1.0, 1.0, 3.0)), 40.0), (1.0, 1.0, 1.0)))
    spicules = _ball(5.0)
    for dr, dc in ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)):
        for t in range(5, 13):
            spicules[N // 2, N // 2 + dr * t, N // 2 + dc * t] = True
    spiculated = _named(features_3d(_with(_lung(), spicules, 40.0), (1.0, 1.0, 1.0)))
    assert cigar["n3d_elongation"] < 0.5 and cigar["n3d_major_axis_mm"] > ball["n3d_major_axis_mm"]
    assert spiculated["n3d_solidity"] < ball["n3d_solidity"] - 0.2
    assert spiculated["n3d_min_compactness"] < ball["n3d_min_compactness"] - 0.3
    assert spiculated["n3d_depth_ratio"] < ball["n3d_depth_ratio"]


def test_density_shares_separate_calcified_solid_and_ground_glass():
    calcified = _named(features_3d(_with(_lung(), _ball(5.0), 700.0), (1.0, 1.0, 1.0)))
    ggo = _named(features_3d(_with(_lung(), _ball(5.0), -420.0), (1.0, 1.0, 1.0)))
    assert calcified["n3d_dense_fraction"] == 1.0 and calcified["n3d_max_hu"] == pytest.approx(700.0)
    assert ggo["n3d_ggo_fraction"] == 1.0 and ggo["n3d_p90_hu"] == pytest.approx(-420.0)


def test_nodule_on_the_wall_is_detached():
    wall = C >= N - 6
    nodule = _ball(5.0)
    # Joined to the wall by a neck two voxels wide.
    neck = (np.abs(Z - N // 2) <= 1) & (np.abs(R - N // 2) <= 1) & (C >= N // 2)
    mask = segment_nodule_3d(_with(_lung(), wall | nodule | neck, 40.0), (1.0, 1.0, 1.0))
    assert mask[nodule].all()
    assert not mask[:, :, N - 3:].any()
    assert mask.sum() < nodule.sum() * 1.3


def test_seed_found_off_centre_and_empty_when_air():
    off = segment_nodule_3d(_with(_lung(), _ball(2.0, centre=(N // 2, N // 2 + 3, N // 2)), 40.0), (1.0, 1.0, 1.0))
    assert off.sum() == _ball(2.0).sum()
    assert not segment_nodule_3d(_lung(), (1.0, 1.0, 1.0)).any()
    assert np.array_equal(features_3d(_lung(), (1.0, 1.0, 1.0)), np.zeros(len(NAMES_3D)))


def test_a_single_plane_works():
    plane = _with(_lung(), _ball(5.0), 40.0)[N // 2:N // 2 + 1]
    f = _named(features_3d(plane, (2.5, 1.0, 1.0)))
    assert f["n3d_z_extent_mm"] == 2.5 and f["n3d_solidity"] == 1.0 and f["n3d_margin_gradient"] == 0.0


@pytest.mark.parametrize("volume, spacing", [
    (np.zeros((4, 4)), (1.0, 1.0, 1.0)),
    (np.zeros((3, 4, 4)), (1.0, 0.0, 1.0)),
    (np.zeros((3, 4, 4)), (1.0, 1.0)),
    ([[[1.0]]], (1.0, 1.0, 1.0)),
])
def test_bad_input_is_a_named_error(volume, spacing):
    with pytest.raises(InputError):
        features_3d(volume, spacing)


def test_bad_radius_is_a_config_error():
    with pytest.raises(ConfigError):
        segment_nodule_3d(_lung(), (1.0, 1.0, 1.0), max_radius_frac=0.0)


def test_a_ground_glass_nodule_is_segmented():
    """Texture-1 ground glass (-560 HU) is a nodule to the 3D figures, not an empty mask."""
    f = _named(features_3d(_with(_lung(), _ball(4.0), -560.0), (1.0, 1.0, 1.0)))
    assert f["n3d_equiv_diameter_mm"] == pytest.approx(8.0, rel=0.1)
    assert f["n3d_ggo_fraction"] == 1.0
