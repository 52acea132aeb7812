"""Patch geometry: world <-> voxel, patch cutting and samplers, on tiny arrays (no Spark)."""
from __future__ import annotations

import numpy as np
import pytest

from ctlake.core.patch_geometry import (
    SliceGeometry,
    extract_patch,
    extract_patch_stack,
    nearest_slice,
    patch_to_image_matrix,
    resample_planes,
    series_z_positions,
    sliding_window_centers,
    stack_indices,
    world_to_voxel,
)
from ctlake.errors import ConfigError, InputError

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _axial_series_descending() -> list[SliceGeometry]:
    # Six slices stored top-down: z = 40.0, 37.5, 35.0, 32.5, 30.0, 27.5 mm (2.5 mm apart).
    # PixelSpacing = [0.7, 0.8]: 0.7 mm between rows (along y), 0.8 mm between columns (along x).
    return [SliceGeometry(position=(-170.5, -180.25, 40.0 - 2.5 * k), orientation=AXIAL,
                          spacing_row=0.7, spacing_col=0.8) for k in range(6)]


def test_world_to_voxel_hand_computed_origin_spacing_descending_order():
    geometries = _axial_series_descending()
    # x = -170.5 + 12.25 columns * 0.8 mm = -170.5 + 9.8  = -160.7
    # y = -180.25 + 20.5 rows  * 0.7 mm = -180.25 + 14.35 = -165.9
    # z = 33.4: |33.4 - 32.5| = 0.9 < |33.4 - 35.0| = 1.6, so slice k = 3 (z = 32.5)
    index, row, col = world_to_voxel((-160.7, -165.9, 33.4), geometries)
    assert index == 3
    assert row == pytest.approx(20.5, abs=1e-9)
    assert col == pytest.approx(12.25, abs=1e-9)
    # The top slice (z = 40.0, stored first) and a point above the series.
    assert world_to_voxel((-170.5, -180.25, 39.0), geometries) == (0, 0.0, 0.0)
    assert world_to_voxel((-170.5, -180.25, 100.0), geometries)[0] == 0
    # Below the bottom slice (z = 27.5, stored last).
    assert world_to_voxel((-170.5, -180.25, 20.0), geometries)[0] == 5


def test_world_to_voxel_hand_computed_swapped_axes():
    # Row direction +y (columns grow along y), column direction -x (rows grow towards -x).
    geometry = SliceGeometry(position=(10.0, 20.0, 5.0), orientation=(0, 1, 0, -1, 0, 0),
                             spacing_row=0.7, spacing_col=0.8)
    np.testing.assert_allclose(geometry.normal, [0, 0, 1])
    # row 4 -> x = 10 - 4 * 0.7 = 7.2 ; col 3 -> y = 20 + 3 * 0.8 = 22.4
    np.testing.assert_allclose(geometry.pixel_to_world(4, 3), [7.2, 22.4, 5.0])
    assert geometry.world_to_pixel((7.2, 22.4, 5.0)) == pytest.approx((4.0, 3.0), abs=1e-9)
    # The out-of-plane part of a point is dropped by the projection.
    assert geometry.world_to_pixel((7.2, 22.4, 9.0)) == pytest.approx((4.0, 3.0), abs=1e-9)


def _rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@pytest.mark.parametrize("orientation", [
    (0, 1, 0, 1, 0, 0),             # swapped axes: normal -z
    (-1, 0, 0, 0, -1, 0),           # both negated
    (1, 0, 0, 0, 0, -1),            # coronal
    tuple(np.concatenate([_rotation((1, 2, 3), 30) @ [1, 0, 0], _rotation((1, 2, 3), 30) @ [0, 1, 0]])),
])
def test_rotated_orientation_round_trip_and_slice_choice(orientation):
    first = SliceGeometry(position=(-170.5, -180.25, 12.0), orientation=orientation,
                          spacing_row=0.7, spacing_col=0.8)
    normal = first.normal
    # Slices 1.25 mm apart stored against the normal (descending z), slightly shifted in-plane each.
    geometries = [SliceGeometry(position=tuple(np.asarray(first.position) - 1.25 * k * normal
                                               + 0.1 * k * first.row_direction),
                                orientation=orientation, spacing_row=0.7, spacing_col=0.8) for k in range(7)]
    z = series_z_positions(geometries)
    assert np.all(np.diff(z) < 0)
    rows, cols = np.array([0.0, 20.5, 511.0, -3.25]), np.array([0.0, 12.25, 3.0, 700.5])
    for geometry in geometries:
        world = geometry.pixel_to_world(rows, cols)
        back_rows, back_cols = geometry.world_to_pixel(world)
        np.testing.assert_allclose(back_rows, rows, atol=1e-9)
        np.testing.assert_allclose(back_cols, cols, atol=1e-9)
    point = geometries[4].pixel_to_world(20.5, 12.25) + 0.5 * normal  # 0.5 mm off slice 4, 0.75 from slice 3
    index, row, col = world_to_voxel(point, geometries)
    assert index == 4
    assert (row, col) == pytest.approx((20.5, 12.25), abs=1e-9)


def test_world_to_voxel_rejects_mixed_planes():
    geometries = _axial_series_descending()[:2] + [SliceGeometry((0, 0, 0), (1, 0, 0, 0, 0, -1), 0.7, 0.8)]
    with pytest.raises(InputError, match="not parallel"):
        world_to_voxel((0, 0, 0), geometries)


def test_slice_geometry_from_slices_row_and_validation():
    geometry = SliceGeometry.from_slice_row({"image_position": [-170.5, -180.25, 3.0], "image_orientation": AXIAL,
                                             "pixel_spacing_row": 0.7, "pixel_spacing_col": 0.8})
    assert geometry == SliceGeometry((-170.5, -180.25, 3.0), AXIAL, 0.7, 0.8)
    assert geometry.z == 3.0
    with pytest.raises(InputError, match="spacings"):
        SliceGeometry((0, 0, 0), AXIAL, 0.0, 0.8)
    with pytest.raises(InputError, match="6 finite"):
        SliceGeometry((0, 0, 0), (1, 0, 0, 0, 1), 0.7, 0.8)


def test_nearest_slice_any_order_and_ties():
    assert nearest_slice(np.array([0.0, 2.5, 5.0]), 3.0) == 1
    assert nearest_slice(np.array([5.0, 2.5, 0.0]), 3.0) == 1
    assert nearest_slice(np.array([5.0, 2.5, 0.0]), 4.0) == 0
    # 1.25 is exactly halfway: the lower index wins in either order.
    assert nearest_slice(np.array([0.0, 2.5]), 1.25) == 0
    assert nearest_slice(np.array([2.5, 0.0]), 1.25) == 0
    with pytest.raises(InputError):
        nearest_slice(np.array([]), 1.0)


def _random_slice(dtype, shape=(96, 112), seed=7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape).astype(np.uint8)
    return rng.integers(-1024, 3071, size=shape).astype(np.int16)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8])
@pytest.mark.parametrize("out_px", [31, 32, 33, 64])
@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_patch_centre_pixel_is_the_candidate_voxel(dtype, out_px, interpolation):
    image = _random_slice(dtype)
    for center in [(40, 57), (0, 0), (95, 111), (13, 90)]:
        patch = extract_patch(image, center, size_mm=23.3, out_px=out_px, spacing_rc=(0.7, 0.8),
                              pad_value=0, interpolation=interpolation)
        assert patch.shape == (out_px, out_px)
        assert patch.dtype == dtype
        assert patch[out_px // 2, out_px // 2] == image[center]


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_patch_at_one_to_one_scale_is_the_image_region(interpolation):
    image = _random_slice(np.int16)
    c = 50
    # spacing 0.5 mm, 16 mm in 32 px: 0.5 mm per patch pixel = 1 image pixel; centre pixel 16 is image c.
    patch = extract_patch(image, (c, c), size_mm=16, out_px=32, spacing_rc=(0.5, 0.5), pad_value=-1024,
                          interpolation=interpolation)
    np.testing.assert_array_equal(patch, image[c - 16:c + 16, c - 16:c + 16])


def test_patch_anisotropic_spacing_and_downsampling():
    image = _random_slice(np.int16)
    r, c = 48, 56
    # 0.5 mm rows, 0.25 mm columns, 16 mm in 32 px (0.5 mm steps): 1 row and 2 columns per patch pixel.
    patch = extract_patch(image, (r, c), size_mm=16, out_px=32, spacing_rc=(0.5, 0.25), pad_value=-1024,
                          interpolation="nearest")
    np.testing.assert_array_equal(patch, image[r - 16:r + 16, c - 32:c + 32:2])
    # 0.5 mm pixels, 32 mm in 16 px (2 mm steps): every 4th pixel, pixel 8 on the centre.
    patch = extract_patch(image, (r, c), size_mm=32, out_px=16, spacing_rc=(0.5, 0.5), pad_value=-1024,
                          interpolation="linear")
    np.testing.assert_array_equal(patch, image[r - 32:r + 32:4, c - 32:c + 32:4])
    np.testing.assert_allclose(patch_to_image_matrix((r, c), 32, 16, (0.5, 0.5)),
                               [[4, 0, r - 8 * 4], [0, 4, c - 8 * 4]])


@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_border_candidate_gives_full_patch_padded_outside(interpolation):
    image = _random_slice(np.int16, shape=(40, 40))
    patch = extract_patch(image, (0, 0), size_mm=16, out_px=32, spacing_rc=(0.5, 0.5), pad_value=-1024,
                          interpolation=interpolation)
    assert patch.shape == (32, 32)
    assert np.all(patch[:16, :] == -1024)
    assert np.all(patch[:, :16] == -1024)
    np.testing.assert_array_equal(patch[16:, 16:], image[:16, :16])
    # The bottom-right corner too, for uint8 with a non-zero pad.
    small = _random_slice(np.uint8, shape=(40, 40))
    patch = extract_patch(small, (39, 39), size_mm=16, out_px=32, spacing_rc=(0.5, 0.5), pad_value=7,
                          interpolation=interpolation)
    np.testing.assert_array_equal(patch[:17, :17], small[23:, 23:])
    assert np.all(patch[17:, :] == 7) and np.all(patch[:, 17:] == 7)


def test_patch_integer_output_is_rounded_not_truncated():
    image = np.array([[0, 3]], dtype=np.int16)
    # One output pixel at column 0.5: linear gives 1.5 -> rounded to 2 (truncation would give 1).
    patch = extract_patch(image, (0, 0.5), size_mm=1, out_px=1, spacing_rc=(1, 1), pad_value=0)
    assert patch.dtype == np.int16 and patch[0, 0] == 2
    with pytest.raises(ConfigError, match="interpolation"):
        extract_patch(image, (0, 0), size_mm=1, out_px=1, spacing_rc=(1, 1), pad_value=0, interpolation="area")
    with pytest.raises(InputError, match="2D"):
        extract_patch(image[0], (0, 0), size_mm=1, out_px=1, spacing_rc=(1, 1), pad_value=0)


def test_stack_indices_follow_z_not_storage_order():
    z = np.array([40.0, 37.5, 35.0, 32.5])  # stored descending
    assert stack_indices(z, 0) == [1, 0, None]      # top slice: nothing above it
    assert stack_indices(z, 3) == [None, 3, 2]      # bottom slice: nothing below it
    assert stack_indices(z[::-1], 1, offsets=(-2, -1, 0, 1, 2)) == [None, 0, 1, 2, 3]


def test_patch_stack_pads_missing_neighbours():
    top, below = _random_slice(np.int16, seed=1), _random_slice(np.int16, seed=2)
    z = np.array([40.0, 37.5])
    slices = [top, below]
    indices = stack_indices(z, 0)                   # [1, 0, None]
    images = [slices[i] if i is not None else None for i in indices]
    stack = extract_patch_stack(images, (48, 56), size_mm=16, out_px=32, spacing_rc=(0.5, 0.5),
                                pad_value=-1024, interpolation="nearest")
    assert stack.shape == (3, 32, 32) and stack.dtype == np.int16
    np.testing.assert_array_equal(stack[0], below[32:64, 40:72])
    np.testing.assert_array_equal(stack[1], top[32:64, 40:72])
    assert np.all(stack[2] == -1024)
    # One centre per slice.
    stack = extract_patch_stack([top, below], [(48, 56), (50, 50)], size_mm=16, out_px=32,
                                spacing_rc=(0.5, 0.5), pad_value=-1024, interpolation="nearest")
    np.testing.assert_array_equal(stack[1], below[34:66, 34:66])


def test_resample_planes_interpolates_in_mm_and_pads_past_the_ends():
    planes = np.stack([np.full((2, 2), v, dtype=np.int16) for v in (0, 30, 90)])
    # Native slices 3 mm apart at z = 10, 13, 19 (a slice missing at 16).
    out = resample_planes(planes, [10.0, 13.0, 19.0], [9.0, 10.0, 11.5, 13.0, 16.0, 19.0, 19.5], -1000.0)
    assert out.dtype == np.float32 and out.shape == (7, 2, 2)
    assert out[:, 0, 0].tolist() == [-1000.0, 0.0, 15.0, 30.0, 60.0, 90.0, -1000.0]
    assert resample_planes(planes[:1], [5.0], [5.0, 6.0], -1.0)[:, 0, 0].tolist() == [0.0, -1.0]
    with pytest.raises(InputError):
        resample_planes(planes, [10.0, 10.0, 19.0], [10.0], 0.0)
    with pytest.raises(InputError):
        resample_planes(planes, [10.0, 13.0], [10.0], 0.0)


def test_sliding_windows_hand_case():
    mask = np.zeros((20, 20), dtype=bool)
    mask[:10, :10] = True
    # Grid 2, 6, 10, 14, 18; window 4 around 10 spans rows 8..11 -> 2 of its 4 rows in the mask.
    # (10, 2): 8/16 = 0.5 kept; (10, 10): 4/16 = 0.25 dropped; anything at 14 or 18 is empty.
    centers = sliding_window_centers(mask, stride_px=4, window_px=4, min_mask_fraction=0.5)
    expected = [(2, 2), (2, 6), (2, 10), (6, 2), (6, 6), (6, 10), (10, 2), (10, 6)]
    np.testing.assert_array_equal(centers, np.array(expected))
    assert centers.dtype == np.int64


@pytest.mark.parametrize("window_px, stride_px, fraction", [(5, 3, 0.5), (8, 8, 0.9), (7, 2, 0.01), (4, 5, 0.0)])
def test_sliding_windows_match_brute_force(window_px, stride_px, fraction):
    rng = np.random.default_rng(3)
    mask = np.zeros((37, 41), dtype=np.uint8)
    mask[5:30, 8:25] = 1
    mask[rng.random(mask.shape) < 0.05] = 1
    centers = {tuple(c) for c in sliding_window_centers(mask, stride_px, window_px, fraction)}
    half = window_px // 2
    expected = set()
    for r in range(half, 37, stride_px):
        for c in range(half, 41, stride_px):
            window = mask[max(r - half, 0):r - half + window_px, max(c - half, 0):c - half + window_px]
            if window.sum() / window_px ** 2 >= fraction:
                expected.add((r, c))
    assert centers == expected
    if fraction > 0:
        assert all(mask[max(r - half, 0):r - half + window_px, max(c - half, 0):c - half + window_px].any()
                   for r, c in centers)


def test_sliding_windows_empty_mask():
    assert sliding_window_centers(np.zeros((16, 16)), 4, 4).shape == (0, 2)


