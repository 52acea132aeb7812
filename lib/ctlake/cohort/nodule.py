"""Hounsfield units of one nodule from its readers' consensus shape and median ratings.

Only what the LIDC readers rated as visible reaches the pixels:

* texture (1 ground-glass, 3 part-solid, 5 solid; 2 and 4 in between): the
  deepest part of the nodule is a solid core (~35 HU) whose share of the
  volume grows with the rating (0%, 10%, 35%, 70%, 100%), the rest is
  ground-glass (~-560 HU at 1 up to ~-330 HU at 4);
* calcification (1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central,
  6 absent): the pattern drawn in dense 400-900 HU;
* internal structure (1 soft tissue, 2 fluid, 3 fat, 4 air): the centre
  becomes water (~10 HU), fat (~-90 HU) or a few air bubbles;
* spiculation (1..5): ``2 * (rating - 1)`` thin spicules drawn out of the
  real contour, on top of the margin and lobulation the contour already has.

Random draws (exact HU levels, bubble and spicule positions) come from a
generator seeded per nodule, never from the malignancy rating.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage

from ctlake.cohort.lidc import LIDC_MATRIX

TEXTURE_POINTS = (1.0, 2.0, 3.0, 4.0, 5.0)
#: Share of the nodule volume that is solid core at each texture rating.
CORE_FRACTION = (0.0, 0.1, 0.35, 0.7, 1.0)
#: Ground-glass attenuation (HU) at each texture rating.
GROUND_GLASS_HU = (-560.0, -480.0, -420.0, -330.0, -330.0)
SOLID_HU = 35.0
FLUID_HU = 10.0
FAT_HU = -90.0
AIR_HU = -950.0


def occupancy_on_grid(mask_512: np.ndarray, row0: int, col0: int, matrix: int) -> np.ndarray:
    """Area fraction (0..1) of each output pixel covered by a consensus mask given on the 512 grid.

    The 512 x 512 field of view is kept, so this is an area-weighted resize:
    the nodule keeps its physical size and small nodules get partial-volume
    edges rather than vanishing.  Returns ``(planes, matrix, matrix)`` float32.
    """
    planes = np.zeros((mask_512.shape[0], matrix, matrix), dtype=np.float32)
    full = np.zeros((LIDC_MATRIX, LIDC_MATRIX), dtype=np.float32)
    rows, cols = mask_512.shape[1:]
    for k, plane in enumerate(mask_512):
        full[:] = 0.0
        full[row0:row0 + rows, col0:col0 + cols] = plane
        interpolation = cv2.INTER_AREA if matrix <= LIDC_MATRIX else cv2.INTER_LINEAR
        planes[k] = cv2.resize(full, (matrix, matrix), interpolation=interpolation)
    return planes


def render_nodule(occupancy: np.ndarray, ratings: dict, spacing_mm: tuple[float, float, float],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Nodule HU and final occupancy (spicules added) on a crop of the output grid.

    Parameters
    ----------
    occupancy : ndarray, shape (planes, rows, cols)
        Consensus area fraction per voxel, with room around it for spicules.
    ratings : dict
        Median reader ratings (``texture``, ``calcification``, ``internal_structure``, ``spiculation``).
    spacing_mm : tuple
        Voxel size (slice spacing, row spacing, column spacing) in mm.
    rng : numpy.random.Generator
        Seeded per nodule.

    Returns
    -------
    hu : ndarray, float32
        The nodule's HU wherever occupancy > 0 (meaningless elsewhere).
    occupancy : ndarray, float32
        Occupancy including spicules; blend as ``background * (1 - occ) + hu * occ``.
    """
    inside = occupancy >= 0.5
    if not inside.any():
        inside = occupancy >= occupancy.max() * 0.5
    depth = ndimage.distance_transform_edt(inside, sampling=spacing_mm)
    max_depth = float(depth.max())
    relative = depth / max_depth if max_depth > 0 else depth

    texture = float(np.clip(ratings["texture"], 1.0, 5.0))
    core_fraction = float(np.interp(texture, TEXTURE_POINTS, CORE_FRACTION))
    ground_glass = float(np.interp(texture, TEXTURE_POINTS, GROUND_GLASS_HU)) + rng.normal(0.0, 20.0)
    solid = SOLID_HU + rng.normal(0.0, 10.0)
    hu = np.full(occupancy.shape, ground_glass, dtype=np.float32)
    if core_fraction >= 1.0:
        hu[:] = solid
    elif core_fraction > 0.0:
        hu[inside & (relative >= np.quantile(relative[inside], 1.0 - core_fraction))] = solid

    centre = inside & (relative >= 0.75)
    structure = int(ratings["internal_structure"])
    if structure == 2:
        hu[centre] = FLUID_HU
    elif structure == 3:
        hu[centre] = FAT_HU
    elif structure == 4:
        for point in _random_voxels(rng, inside & (relative >= 0.4), 3):
            hu[_ball(hu.shape, point, max(0.8, 0.15 * max_depth), spacing_mm)] = AIR_HU

    hu = _calcify(hu, inside, relative, max_depth, int(ratings["calcification"]), spacing_mm, rng)
    occupancy = _spicules(occupancy, inside, round(2 * (float(ratings["spiculation"]) - 1)),
                          spacing_mm, rng)
    # Partial-volume rim and spicules: solid for mostly solid nodules, ground glass otherwise.
    hu[(occupancy > 0) & ~inside] = solid if core_fraction > 0.5 else ground_glass
    return hu, occupancy


def _random_voxels(rng: np.random.Generator, region: np.ndarray, count: int) -> list[tuple]:
    candidates = np.argwhere(region)
    if not len(candidates):
        return []
    picks = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [tuple(candidates[i]) for i in np.sort(picks)]


def _ball(shape: tuple, centre: tuple, radius_mm: float, spacing_mm: tuple) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    distance2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing_mm))
    return distance2 <= radius_mm ** 2


def _calcify(hu: np.ndarray, inside: np.ndarray, relative: np.ndarray, max_depth: float, pattern: int,
             spacing_mm: tuple, rng: np.random.Generator) -> np.ndarray:
    """Draw the rated calcification pattern (1 popcorn .. 5 central; 6 absent) in dense HU."""
    dense = rng.uniform(450.0, 900.0)
    blob = max(0.8, 0.3 * max_depth)
    if pattern == 1:
        for point in _random_voxels(rng, inside & (relative >= 0.2), int(rng.integers(3, 7))):
            hu[_ball(hu.shape, point, blob, spacing_mm) & inside] = dense
    elif pattern == 2:
        rings = ((relative >= 0.3) & (relative < 0.42)) | ((relative >= 0.65) & (relative < 0.8))
        hu[inside & rings] = dense * 0.7
    elif pattern == 3:
        hu[inside] = dense
    elif pattern == 4:
        for point in _random_voxels(rng, inside & (relative >= 0.2) & (relative < 0.5), 1):
            hu[_ball(hu.shape, point, blob * 1.3, spacing_mm) & inside] = dense
    elif pattern == 5:
        hu[inside & (relative >= 0.55)] = dense
    return hu


def _spicules(occupancy: np.ndarray, inside: np.ndarray, count: int, spacing_mm: tuple,
              rng: np.random.Generator) -> np.ndarray:
    """Add ``count`` thin radial strands (3-10 mm, about 1 mm wide) leaving the nodule surface."""
    if count <= 0:
        return occupancy
    occupancy = occupancy.copy()
    planes = np.flatnonzero(inside.any(axis=(1, 2)))
    row_mm, col_mm = spacing_mm[1], spacing_mm[2]
    for _ in range(count):
        k = int(rng.choice(planes))
        rows, cols = np.nonzero(inside[k])
        centre = np.array([cols.mean(), rows.mean()])
        radius_px = max(float(np.max(np.hypot(cols - centre[0], rows - centre[1]))), 0.5)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        direction = np.array([math.cos(angle), math.sin(angle)])
        length_px = rng.uniform(3.0, 10.0) / col_mm
        start = centre + direction * radius_px * 0.7
        end = centre + direction * (radius_px + length_px)
        strand = np.zeros(inside.shape[1:], dtype=np.uint8)
        scale = 16
        cv2.line(strand, tuple(int(v) for v in np.round(start * scale)), tuple(int(v) for v in np.round(end * scale)),
                 255, max(round(1.0 / row_mm), 1), cv2.LINE_AA, 4)
        occupancy[k] = np.maximum(occupancy[k], strand.astype(np.float32) / 255.0 * 0.8)
    return occupancy
