"""A synthetic chest in patient millimetres, rendered slice by slice in Hounsfield units.

The chest is a seeded random variation of one layout: air outside (-1000 HU),
a body outline with subcutaneous fat (~-100 HU) and muscle (~40 HU), ribs at
the chest wall (cortex ~650 HU, marrow ~220 HU), a mediastinum with heart and
descending aorta (~40 HU, no contrast), sternum and spine, and two lungs
around -850 HU with low-frequency texture, a gravity gradient and 3-D
branching vessel trees.  Vessels seen end-on are round bright spots in the
lung, which is what makes false-positive nodule candidates plausible.

Everything is drawn in world coordinates (x to the patient's left, y to the
back, z along the table, mm); :class:`Grid` maps them to pixels.  Nothing
here depends on the patient's nodules or labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Fractional bits of the fixed-point coordinates handed to OpenCV's drawing functions.
_SHIFT = 4
_SCALE = 1 << _SHIFT

AIR_HU = -1000.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
BLOOD_HU = 40.0
CORTICAL_BONE_HU = 650.0
MARROW_HU = 220.0


@dataclass(frozen=True)
class Grid:
    """Pixel grid of one image: pixel (row, col) has centre x = x0 + col*spacing, y = y0 + row*spacing (mm)."""

    matrix: int
    spacing: float
    x0: float
    y0: float

    def to_pixels(self, xy_mm: np.ndarray) -> np.ndarray:
        """World (x, y) mm to fixed-point (col, row) for OpenCV drawing."""
        cols = (xy_mm[..., 0] - self.x0) / self.spacing
        rows = (xy_mm[..., 1] - self.y0) / self.spacing
        return np.round(np.stack([cols, rows], axis=-1) * _SCALE).astype(np.int32)

    def length(self, mm: float) -> int:
        """A length in mm as fixed-point pixels."""
        return max(round(mm / self.spacing * _SCALE), 1)

    def world(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (row, col), fractional allowed, to world (x, y) mm."""
        return self.x0 + np.asarray(cols) * self.spacing, self.y0 + np.asarray(rows) * self.spacing


@dataclass(frozen=True)
class Chest:
    """One patient's synthetic chest; polygons are (n, 2) arrays of world (x, y) mm.

    ``vessel_points`` are (n, 3) world mm samples along the vessel centre
    lines with ``vessel_radii`` (mm) and unit ``vessel_directions``.
    """

    body: np.ndarray
    muscle: np.ndarray
    lungs: tuple
    rib_ellipse: tuple
    ribs: tuple
    rib_pitch: float
    heart: tuple
    aorta: tuple
    spine: tuple
    sternum: tuple
    mediastinum_half_width: float
    lung_top: float
    lung_height: float
    vessel_points: np.ndarray
    vessel_radii: np.ndarray
    vessel_directions: np.ndarray


def _blob(rng: np.random.Generator, cx: float, cy: float, ax: float, ay: float,
          roughness: float, n: int = 160) -> np.ndarray:
    """An ellipse with a few random low harmonics on its radius, as a closed polygon in mm."""
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    radius = np.ones_like(t)
    for k in range(2, 6):
        radius += rng.uniform(0.0, roughness) / k * np.cos(k * t + rng.uniform(0.0, 2.0 * math.pi))
    return np.column_stack([cx + ax * radius * np.cos(t), cy + ay * radius * np.sin(t)])


def make_chest(rng: np.random.Generator, z_min: float, z_max: float) -> Chest:
    """Draw one patient's chest layout and vessel trees for the slab ``z_min..z_max`` (mm)."""
    a_body, b_body = rng.uniform(140.0, 175.0), rng.uniform(98.0, 122.0)
    cy = rng.uniform(-6.0, 8.0)
    fat, muscle = rng.uniform(6.0, 24.0), rng.uniform(8.0, 14.0)
    body = _blob(rng, 0.0, cy, a_body, b_body, 0.04)
    inner = _blob(rng, 0.0, cy, a_body - fat, b_body - fat, 0.04)
    a_in, b_in = a_body - fat - muscle - 8.0, b_body - fat - muscle - 8.0
    rib_ellipse = (0.0, cy, a_in + 5.0, b_in + 5.0)
    rib_angles = np.concatenate([np.linspace(110.0, 250.0, 7), np.linspace(-70.0, 70.0, 7)])
    ribs = tuple((float(a + rng.uniform(-5, 5)), float(rng.uniform(0, 2 * math.pi))) for a in rib_angles)
    lungs = (
        _blob(rng, -0.52 * a_in, cy + 0.03 * b_in, 0.45 * a_in, 0.84 * b_in, 0.08),
        _blob(rng, 0.52 * a_in, cy + 0.03 * b_in, 0.43 * a_in, 0.82 * b_in, 0.08),
    )
    spine_r = rng.uniform(14.0, 18.0)
    spine = (0.0, cy + 0.78 * b_in, spine_r)
    chest = {
        "body": body, "muscle": inner, "lungs": lungs, "rib_ellipse": rib_ellipse, "ribs": ribs,
        "rib_pitch": rng.uniform(22.0, 30.0),
        "heart": (0.12 * a_in, cy - 0.22 * b_in, 0.36 * a_in, 0.44 * b_in, rng.uniform(15, 40),
               rng.uniform(0, 2 * math.pi)),
        "aorta": (spine_r + 10.0, spine[1] - spine_r * 0.6, rng.uniform(10.0, 14.0)),
        "spine": spine,
        "sternum": (0.0, cy - b_in - 3.0, 14.0, 6.0),
        "mediastinum_half_width": rng.uniform(0.08, 0.12) * a_in,
        "lung_top": cy - 0.84 * b_in,
        "lung_height": 1.68 * b_in,
    }
    points, radii, directions = _vessels(rng, lungs, a_in, b_in, cy, z_min, z_max)
    return Chest(**chest, vessel_points=points, vessel_radii=radii, vessel_directions=directions)


def _inside(polygons: tuple, x: float, y: float) -> bool:
    return any(cv2.pointPolygonTest(p.astype(np.float32), (float(x), float(y)), False) > 0 for p in polygons)


def _vessels(rng: np.random.Generator, lungs: tuple, a_in: float, b_in: float, cy: float,
             z_min: float, z_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Branching vessel trees from each hilum, sampled as points with radius and direction.

    Each tree starts at the hilum with a 3-5 mm radius, branches in two at
    20-45 degrees with radii shrinking to 55-85%, stops at the lung boundary,
    outside the slab (+-25 mm) or below 0.6 mm, like pulmonary arteries.
    """
    segments = []
    slab = max(z_max - z_min, 1.0)
    n_roots = 3 + math.ceil(slab / 25.0)
    for side, lung in zip((-1.0, 1.0), lungs):
        hilum = np.array([side * 0.2 * a_in, cy + 0.05 * b_in])
        for k in range(n_roots):
            z = z_min - 10.0 + (slab + 20.0) * (k + rng.uniform(0.2, 0.8)) / n_roots
            direction = np.array([side, rng.uniform(-0.7, 0.7), rng.uniform(-0.6, 0.6)])
            stack = [(np.array([hilum[0], hilum[1], z]), direction / np.linalg.norm(direction),
                      rng.uniform(3.0, 5.0))]
            while stack:
                start, direction, radius = stack.pop()
                length = (4.0 + 5.0 * radius) * rng.uniform(0.8, 1.2)
                end = start + direction * length
                if not _inside((lung,), end[0], end[1]):
                    end = start + direction * length * 0.5
                    if not _inside((lung,), end[0], end[1]):
                        continue
                segments.append((start, end, radius))
                if abs(end[2] - (z_min + z_max) / 2) > slab / 2 + 25.0:
                    continue
                axis = np.cross(direction, rng.normal(size=3))
                axis /= np.linalg.norm(axis)
                for turn, shrink in ((rng.uniform(20, 45), rng.uniform(0.65, 0.85)),
                                     (-rng.uniform(20, 45), rng.uniform(0.55, 0.8))):
                    if radius * shrink < 0.6:
                        continue
                    angle = math.radians(turn)
                    child = direction * math.cos(angle) + np.cross(axis, direction) * math.sin(angle)
                    stack.append((end, child / np.linalg.norm(child), radius * shrink))
    points, radii, directions = [], [], []
    for start, end, radius in segments:
        length = float(np.linalg.norm(end - start))
        n = max(math.ceil(length / max(0.35, 0.6 * radius)) + 1, 2)
        t = np.linspace(0.0, 1.0, n)[:, None]
        points.append(start + (end - start) * t)
        radii.append(np.full(n, radius))
        directions.append(np.repeat(((end - start) / length)[None], n, axis=0))
    if not points:
        return np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3))
    return np.concatenate(points), np.concatenate(radii), np.concatenate(directions)


def _fill(image: np.ndarray, grid: Grid, polygon_mm: np.ndarray, value: float) -> None:
    cv2.fillPoly(image, [grid.to_pixels(polygon_mm)], value, cv2.LINE_8, _SHIFT)


def _ellipse(image: np.ndarray, grid: Grid, cx: float, cy: float, ax: float, ay: float, value: float,
             angle: float = 0.0, start: float = 0.0, end: float = 360.0, thickness_mm: float | None = None) -> None:
    centre = tuple(int(v) for v in grid.to_pixels(np.array([cx, cy])))
    axes = (grid.length(ax), grid.length(ay))
    thickness = -1 if thickness_mm is None else max(round(thickness_mm / grid.spacing), 1)
    cv2.ellipse(image, centre, axes, angle, start, end, value, thickness, cv2.LINE_8, _SHIFT)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian noise with unit standard deviation and a correlation length of ``sigma_px`` pixels."""
    white = rng.standard_normal(shape).astype(np.float32)
    if sigma_px < 0.3:
        return white
    smooth = cv2.GaussianBlur(white, (0, 0), sigma_px)
    kernel = cv2.getGaussianKernel(2 * math.ceil(3 * sigma_px) + 1, sigma_px)
    return smooth / float(np.sum(kernel ** 2))


def render_slice(chest: Chest, grid: Grid, z: float, thickness: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice at ``z`` mm of slice ``thickness`` mm: float32 HU image and boolean lung mask.

    ``rng`` only drives the tissue texture; the layout comes from ``chest``.
    Vessels are averaged over the slice thickness: a sphere of radius r whose
    centre is dz from the slice shows its largest cross-section within the
    slab, with a weight equal to the fraction of the slab it fills.
    """
    m = grid.matrix
    hu = np.full((m, m), AIR_HU, dtype=np.float32)
    _fill(hu, grid, chest.body, FAT_HU)
    hu += (np.where(hu > AIR_HU, 12.0, 0.0) * smooth_noise(rng, (m, m), 3.0 / grid.spacing)).astype(np.float32)
    _fill(hu, grid, chest.muscle, SOFT_TISSUE_HU)

    cx, cy, ax, ay = chest.rib_ellipse
    for angle, phase in chest.ribs:
        visible = math.sin(2 * math.pi * z / chest.rib_pitch + phase)
        if visible < -0.3:
            continue
        half = 3.0 + 10.0 * max(visible, 0.0)
        _ellipse(hu, grid, cx, cy, ax, ay, CORTICAL_BONE_HU, 0.0, angle - half, angle + half, 8.0)
        _ellipse(hu, grid, cx, cy, ax, ay, MARROW_HU, 0.0, angle - half * 0.8, angle + half * 0.8, 4.0)

    lung = np.zeros((m, m), dtype=np.uint8)
    for polygon in chest.lungs:
        _fill(lung, grid, polygon, 1)
    other = np.zeros((m, m), dtype=np.uint8)
    tissue = np.full((m, m), SOFT_TISSUE_HU, dtype=np.float32)
    half_width = chest.mediastinum_half_width
    top, bottom = chest.sternum[1], chest.spine[1]
    _fill(other, grid, np.array([[-half_width, top], [half_width, top], [half_width, bottom],
                                 [-half_width, bottom]]), 1)
    hx, hy, hax, hay, hangle, hphase = chest.heart
    heart_scale = 0.55 + 0.45 * math.sin(2 * math.pi * z / 180.0 + hphase) ** 2
    _ellipse(other, grid, hx, hy, hax * heart_scale, hay * heart_scale, 1, hangle)
    ax_, ay_, ar = chest.aorta
    _ellipse(other, grid, ax_, ay_, ar, ar, 1)
    sx, sy, sr = chest.spine
    _ellipse(other, grid, sx, sy, sr + 4.0, sr + 4.0, 1)
    lung &= 1 - other
    lung_mask = lung.astype(bool)

    gradient = np.clip((grid.y0 + np.arange(m) * grid.spacing - chest.lung_top) / chest.lung_height, 0, 1)
    parenchyma = (LUNG_HU + 60.0 * gradient[:, None] ** 2
                  + 15.0 * smooth_noise(rng, (m, m), 4.0 / grid.spacing)
                  + 8.0 * smooth_noise(rng, (m, m), 1.0 / grid.spacing)).astype(np.float32)
    hu[lung_mask] = parenchyma[lung_mask]
    hu[other.astype(bool)] = tissue[other.astype(bool)]

    _ellipse(hu, grid, sx, sy, sr, sr, CORTICAL_BONE_HU)
    _ellipse(hu, grid, sx, sy, sr - 2.5, sr - 2.5, MARROW_HU)
    _ellipse(hu, grid, sx, sy + sr + 7.0, 7.0, 7.0, 20.0)
    _fill(hu, grid, np.array([[sx - 3, sy + sr + 14], [sx + 3, sy + sr + 14], [sx + 3, sy + sr + 45],
                              [sx - 3, sy + sr + 45]]), CORTICAL_BONE_HU)
    stx, sty, stax, stay = chest.sternum
    _ellipse(hu, grid, stx, sty, stax, stay, CORTICAL_BONE_HU)
    _ellipse(hu, grid, stx, sty, stax - 2, stay - 2, MARROW_HU)

    occupancy = vessel_occupancy(chest, grid, z, thickness)
    hu[lung_mask] += (occupancy[lung_mask] * (BLOOD_HU - hu[lung_mask]))
    return hu, lung_mask


def vessel_occupancy(chest: Chest, grid: Grid, z: float, thickness: float) -> np.ndarray:
    """Fraction (0..1) of each pixel's slab volume filled by vessel, for the slice at ``z`` mm."""
    image = np.zeros((grid.matrix, grid.matrix), dtype=np.uint8)
    pz, radii = chest.vessel_points[:, 2], chest.vessel_radii
    low, high = z - thickness / 2, z + thickness / 2
    overlap = np.minimum(pz + radii, high) - np.maximum(pz - radii, low)
    selected = np.flatnonzero(overlap > 0)
    if not len(selected):
        return image.astype(np.float32)
    weight = np.minimum(overlap[selected] / thickness, 1.0)
    gap = np.maximum(np.abs(pz[selected] - z) - thickness / 2, 0.0)
    radius = np.sqrt(np.maximum(radii[selected] ** 2 - gap ** 2, 0.0))
    centres = grid.to_pixels(chest.vessel_points[selected, :2])
    # Faint first, strong last: where vessels cross, the stronger one stays.
    for k in np.argsort(weight, kind="stable"):
        cv2.circle(image, (int(centres[k, 0]), int(centres[k, 1])), grid.length(radius[k]),
                   round(255 * weight[k]), -1, cv2.LINE_AA, _SHIFT)
    return image.astype(np.float32) / 255.0
