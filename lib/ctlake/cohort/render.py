"""One synthetic patient: chest volume in HU, the placed nodules and the candidate points.

Seeded generators are split by purpose (anatomy, tissue texture, each
nodule, noise, candidates) so that what one nodule draws never changes the
body, the noise or another nodule, and nothing but the readers' ratings and
contours differs between a malignant and a benign nodule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ctlake.cohort import anatomy, dicom_writer, nodule
from ctlake.cohort.plan import NoduleSpec, PatientSpec

#: In-plane noise standard deviation (HU) is drawn in this range for 0.7 mm pixels and
#: scaled by 0.7 / pixel spacing, as averaging bigger pixels lowers quantum noise.
NOISE_HU = (18.0, 35.0)
#: Reach of spicules beyond the contour (mm): the crop around a nodule keeps this margin.
SPICULE_MARGIN_MM = 11.0
#: False-positive candidates per patient: vessels seen end-on, then random lung points.
VESSEL_CANDIDATES = 6
LUNG_CANDIDATES = 3
#: A false-positive candidate keeps this distance (mm) beyond a nodule's radius.
CANDIDATE_CLEARANCE_MM = 10.0


@dataclass(frozen=True)
class PlacedNodule:
    """A rendered nodule: world centre (mm), equivalent diameter (mm) and its mask on the output grid.

    ``mask[k, r, c]`` is voxel (slice ``first_slice + k``, row ``row0 + r``, column ``col0 + c``).
    """

    spec: NoduleSpec
    x: float
    y: float
    z: float
    diameter_mm: float
    mask: np.ndarray
    first_slice: int
    row0: int
    col0: int


@dataclass(frozen=True)
class RenderedPatient:
    """A patient's HU volume ``(slices, matrix, matrix)`` float32, grid, nodules and candidates.

    ``candidates`` are ``(x, y, z, class)`` tuples in world mm, class 1 for nodules.
    """

    volume: np.ndarray
    grid: anatomy.Grid
    nodules: list
    candidates: list


def slice_spacing(z_positions: np.ndarray, slice_thickness: float) -> float:
    """Distance between neighbouring slices (mm): the median step, or the thickness for one slice."""
    if len(z_positions) < 2:
        return float(slice_thickness)
    return float(np.median(np.diff(z_positions)))


def equivalent_diameter(spec: NoduleSpec, pixel_spacing: float, spacing_z: float) -> float:
    """Diameter (mm) of the sphere with the consensus volume, counted on the original 512 grid."""
    volume = float(spec.mask.sum()) * pixel_spacing ** 2 * spacing_z
    return (6.0 * volume / math.pi) ** (1.0 / 3.0)


def render_patient(spec: PatientSpec) -> RenderedPatient:
    """Render the patient's chest, place and render its nodules, add noise and pick candidates."""
    grid = dicom_writer.image_grid(spec.matrix, spec.spacing_mm)
    z = spec.z_positions
    dz = slice_spacing(z, spec.slice_thickness)
    chest = anatomy.make_chest(np.random.default_rng([spec.seed, spec.index, 1]), float(z.min()), float(z.max()))
    texture_rng = np.random.default_rng([spec.seed, spec.index, 2])
    volume = np.empty((len(z), spec.matrix, spec.matrix), dtype=np.float32)
    lungs = np.empty(volume.shape, dtype=bool)
    for k, z_k in enumerate(z):
        volume[k], lungs[k] = anatomy.render_slice(chest, grid, float(z_k), spec.slice_thickness, texture_rng)

    taken = np.zeros((spec.matrix, spec.matrix), dtype=np.uint8)
    placed = []
    for nodule_spec in spec.nodules:
        rng = np.random.default_rng([spec.seed, spec.index, 3, nodule_spec.nodule_id])
        placed.append(_place(volume, lungs, taken, grid, z, dz, spec, nodule_spec, rng))

    noise_rng = np.random.default_rng([spec.seed, spec.index, 5])
    sigma = noise_rng.uniform(*NOISE_HU) * 0.7 / grid.spacing
    for k in range(len(z)):
        volume[k] += sigma * anatomy.smooth_noise(noise_rng, volume.shape[1:], 0.7)

    candidates = [(n.x, n.y, n.z, 1) for n in placed]
    candidates += _false_candidates(chest, grid, z, lungs, placed, np.random.default_rng([spec.seed, spec.index, 6]))
    return RenderedPatient(volume, grid, placed, candidates)


def _place(volume: np.ndarray, lungs: np.ndarray, taken: np.ndarray, grid: anatomy.Grid, z: np.ndarray,
           dz: float, spec: PatientSpec, nodule_spec: NoduleSpec, rng: np.random.Generator) -> PlacedNodule:
    """Move the nodule in-plane to the nearest spot where it fits inside the lung, render and blend it.

    The real position is kept when the nodule fits there; the synthetic lungs
    do not follow the real scan's anatomy, so otherwise the whole nodule is
    shifted (never scaled or reshaped) to the nearest place that fits.
    """
    m = grid.matrix
    occupancy = nodule.occupancy_on_grid(nodule_spec.mask, nodule_spec.row0, nodule_spec.col0, m)
    planes = slice(nodule_spec.first_slice, nodule_spec.first_slice + len(occupancy))
    weights = occupancy.sum(axis=(1, 2))
    footprint = occupancy.max(axis=0)
    total = float(footprint.sum())
    rows_idx, cols_idx = np.indices(footprint.shape)
    flat = occupancy.sum(axis=0)
    centre = np.array([(flat * rows_idx).sum(), (flat * cols_idx).sum()]) / float(flat.sum())
    support = np.argwhere(footprint > 0)
    radius = float(np.max(np.hypot(*(support - centre).T))) if total > 0 else 1.0

    room = (lungs[planes].all(axis=0) & (taken == 0)).astype(np.uint8)
    distance = cv2.distanceTransform(room, cv2.DIST_L2, 5)
    allowed = np.argwhere(distance >= radius + 1.0)
    here = tuple(np.clip(np.round(centre).astype(int), 0, m - 1))
    if distance[here] >= radius + 1.0 or not len(allowed):
        target = np.array(here) if distance[here] >= radius + 1.0 else np.unravel_index(distance.argmax(), distance.shape)
    else:
        target = allowed[np.argmin(np.hypot(*(allowed - centre).T))]
    shift = np.round(np.asarray(target, dtype=float) - centre).astype(int)

    margin = math.ceil(SPICULE_MARGIN_MM / grid.spacing) + 1
    r0, c0 = np.maximum(support.min(axis=0) - margin, 0)
    r1, c1 = np.minimum(support.max(axis=0) + margin + 1, m)
    r0, r1 = max(r0, -shift[0]), min(r1, m - shift[0])
    c0, c1 = max(c0, -shift[1]), min(c1, m - shift[1])
    crop = occupancy[:, r0:r1, c0:c1]
    hu, occ = nodule.render_nodule(crop, nodule_spec.ratings, (dz, grid.spacing, grid.spacing), rng)
    dest = (planes, slice(r0 + shift[0], r1 + shift[0]), slice(c0 + shift[1], c1 + shift[1]))
    volume[dest] = volume[dest] * (1.0 - occ) + hu * occ
    taken[dest[1:]] |= cv2.dilate((occ.max(axis=0) > 0).astype(np.uint8), np.ones((3, 3), np.uint8))

    row, col = centre + shift
    x, y = grid.world(row, col)
    z_mm = float(np.sum(weights * z[planes]) / weights.sum())
    return PlacedNodule(
        spec=nodule_spec, x=float(x), y=float(y), z=z_mm,
        diameter_mm=equivalent_diameter(nodule_spec, spec.pixel_spacing, dz),
        mask=occ >= 0.5, first_slice=nodule_spec.first_slice, row0=int(r0 + shift[0]), col0=int(c0 + shift[1]))


def _false_candidates(chest: anatomy.Chest, grid: anatomy.Grid, z: np.ndarray, lungs: np.ndarray,
                      placed: list, rng: np.random.Generator) -> list[tuple]:
    """Plausible false positives: lung vessels running along z (round spots), then random lung points.

    A candidate stays ``CANDIDATE_CLEARANCE_MM`` beyond every nodule's radius
    and 5 mm from the other candidates.
    """
    chosen: list[np.ndarray] = []

    def acceptable(point: np.ndarray) -> bool:
        k = int(np.argmin(np.abs(z - point[2])))
        row = round((point[1] - grid.y0) / grid.spacing)
        col = round((point[0] - grid.x0) / grid.spacing)
        if not (0 <= row < grid.matrix and 0 <= col < grid.matrix and lungs[k, row, col]):
            return False
        for n in placed:
            if np.linalg.norm(point - (n.x, n.y, n.z)) < n.diameter_mm / 2 + CANDIDATE_CLEARANCE_MM:
                return False
        return all(np.linalg.norm(point - other) >= 5.0 for other in chosen)

    end_on = np.flatnonzero((chest.vessel_radii >= 1.0) & (np.abs(chest.vessel_directions[:, 2]) >= 0.6)
                            & (chest.vessel_points[:, 2] >= z.min()) & (chest.vessel_points[:, 2] <= z.max()))
    vessel_points = []
    for i in rng.permutation(end_on):
        if len(vessel_points) == VESSEL_CANDIDATES:
            break
        point = chest.vessel_points[i]
        if acceptable(point):
            chosen.append(point)
            vessel_points.append(point)
    lung_points = []
    voxels = np.argwhere(lungs)
    for i in rng.integers(0, len(voxels), size=200) if len(voxels) else []:
        if len(lung_points) == LUNG_CANDIDATES:
            break
        k, row, col = voxels[i]
        x, y = grid.world(row, col)
        point = np.array([float(x), float(y), float(z[k])])
        if acceptable(point):
            chosen.append(point)
            lung_points.append(point)
    return [(float(p[0]), float(p[1]), float(p[2]), 0) for p in vessel_points + lung_points]
