"""Nodule candidates in a CT volume: multi-scale blob detection inside the lungs.

Why a blob filter: a nodule is a roughly round lump, solid or ground glass,
from 3 to 30 mm; a vessel is a tube; the lung wall is a sheet.  The
scale-normalised Laplacian of Gaussian (LoG) peaks at the centre of a ball of
radius ``r`` at ``sigma = r / sqrt(3)`` with a height set by the ball's
contrast, whatever its size; a tube or a sheet answers it too, but weaker,
and the Hessian at the peak tells them apart: a ball curves down along all
three axes, a tube along two.  The detector keeps every peak and leaves
"nodule or not" to a learned stage; it only has to miss nothing while
handing over a bounded number of candidates per scan.

Pure numpy/SciPy, no Spark.  Volumes are ``(planes, rows, cols)`` in HU with
their voxel size ``(z, row, col)`` in mm; planes are assumed evenly spaced
(the median spacing of a series).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ctlake.core.patch_geometry import SliceGeometry
from ctlake.errors import ConfigError, InputError


@dataclass(frozen=True)
class DetectorParams:
    """What the detector looks for; every field is part of the candidates' ``detector_hash``.

    Parameters
    ----------
    radii_mm : tuple of float
        Nodule radii the LoG scales are tuned to (``sigma = r / sqrt(3)``).
    min_response_hu : float
        Smallest scale-normalised LoG response (HU) of a kept peak: about
        half the contrast of a ball against its background.
    min_peak_hu : float
        Smallest HU of the volume smoothed at the peak's scale, at the peak:
        below it the lump is too faint to be even ground glass.
    lung_margin_mm : float
        The lung mask is grown by this much, so nodules on the pleura, which
        the per-slice lung mask cuts, still count as inside.
    min_roundness : float
        Smallest ratio of the weakest to the strongest downward curvature at
        the peak (1 for a ball, near 0 for a long tube).
    merge_mm : float
        Peaks closer than ``max(merge_mm, radius of the stronger)`` are one candidate.
    max_per_series : int
        At most this many candidates per series among the dense ones (peak
        at or above ``faint_hu``), the highest ``score`` first.
    faint_hu : float
        Peaks below this smoothed HU are faint (ground glass: -560 to -330 HU
        against lung at -850) and compete only with each other: by score they
        rank below hundreds of vessel cross-sections (measured: ground-glass
        nodules at rank 270-740 of ~530 peaks per scan), by roundness they
        come first.
    max_faint_per_series : int
        At most this many faint candidates per series, the roundest first.
    """

    radii_mm: tuple[float, ...] = (2.0, 3.0, 4.5, 6.5, 9.5, 13.0)
    min_response_hu: float = 60.0
    min_peak_hu: float = -800.0
    lung_margin_mm: float = 3.0
    min_roundness: float = 0.05
    merge_mm: float = 4.0
    max_per_series: int = 40
    faint_hu: float = -500.0
    max_faint_per_series: int = 10

    def __post_init__(self):
        radii = tuple(float(r) for r in self.radii_mm)
        if not radii or any(not math.isfinite(r) or r <= 0 for r in radii):
            raise ConfigError(f"detect.radii_mm must be positive mm values, found {self.radii_mm!r}")
        object.__setattr__(self, "radii_mm", tuple(sorted(radii)))
        for name in ("lung_margin_mm", "merge_mm", "min_response_hu"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"detect.{name} must be >= 0, found {getattr(self, name)!r}")
        if not 0 <= self.min_roundness <= 1:
            raise ConfigError(f"detect.min_roundness must be in [0, 1], found {self.min_roundness!r}")
        for name in ("max_per_series", "max_faint_per_series"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"detect.{name} must be an integer >= 0, found {value!r}")


def detector_hash(params: DetectorParams) -> str:
    """12 hex digits naming the detector's parameters (stored with every candidate)."""
    return hashlib.sha256(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()[:12]


def candidate_key(series_uid: str, candidate: dict, p_hash: str) -> str:
    """A candidate's id: its series, the detector's parameters and its centre voxel (to 0.01 voxel)."""
    text = "|".join([series_uid, p_hash, *(f"{candidate[k]:.2f}" for k in ("plane", "row", "col"))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check(volume_hu, lung_mask, spacing_mm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(volume_hu, np.ndarray) or volume_hu.ndim != 3 or min(volume_hu.shape) == 0:
        raise InputError(f"expected a (planes, rows, cols) HU volume, found "
                         f"{getattr(volume_hu, 'shape', type(volume_hu).__name__)}")
    mask = np.asarray(lung_mask)
    if mask.shape != volume_hu.shape:
        raise InputError(f"lung mask shape {mask.shape} differs from the volume's {volume_hu.shape}")
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"spacing_mm must be three positive mm (z, row, col), found {spacing_mm!r}")
    return volume_hu, mask.astype(bool), spacing


def _grown_mask(mask: np.ndarray, spacing: np.ndarray, margin_mm: float) -> np.ndarray:
    if margin_mm <= 0 or not mask.any():
        return mask
    # Distance in mm from the mask, per axis spacing: a ball, not a voxel cube.
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return outside <= margin_mm


def _second_derivatives(smooth: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """d2/dz2, d2/drow2, d2/dcol2 of a smoothed volume (HU / mm2) by central differences, edges replicated."""
    out = []
    for axis, step in enumerate(spacing):
        if smooth.shape[axis] < 3:
            out.append(np.zeros_like(smooth))
            continue
        padded = np.concatenate([np.take(smooth, [0], axis=axis), smooth, np.take(smooth, [-1], axis=axis)],
                                axis=axis)
        n = smooth.shape[axis]
        ahead = np.take(padded, np.arange(2, n + 2), axis=axis)
        behind = np.take(padded, np.arange(0, n), axis=axis)
        out.append((ahead - 2 * smooth + behind) / step ** 2)
    return out


def _hessian_at(smooth: np.ndarray, spacing: np.ndarray, point: tuple[int, int, int]) -> np.ndarray:
    """3 x 3 Hessian (HU / mm2) of ``smooth`` at one voxel by central differences (clamped at the edges)."""
    upper = np.array(smooth.shape) - 1

    def at(offset) -> float:
        index = np.clip(np.array(point) + offset, 0, upper)
        return float(smooth[tuple(index)])

    hessian = np.zeros((3, 3))
    centre = at((0, 0, 0))
    for a in range(3):
        step = np.eye(3, dtype=int)[a]
        hessian[a, a] = (at(step) - 2 * centre + at(-step)) / spacing[a] ** 2
        for b in range(a + 1, 3):
            other = np.eye(3, dtype=int)[b]
            value = (at(step + other) - at(step - other) - at(-step + other) + at(-step - other))
            hessian[a, b] = hessian[b, a] = value / (4 * spacing[a] * spacing[b])
    return hessian


def _refine(response: np.ndarray, point: tuple[int, int, int]) -> np.ndarray:
    """Sub-voxel peak position: a parabola through the peak and its two neighbours, per axis."""
    refined = np.array(point, dtype=float)
    for axis in range(3):
        if not 0 < point[axis] < response.shape[axis] - 1:
            continue
        step = np.eye(3, dtype=int)[axis]
        before, centre, after = (float(response[tuple(np.array(point) + k * step)]) for k in (-1, 0, 1))
        curvature = before - 2 * centre + after
        if curvature < 0:
            refined[axis] += float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5))
    return refined


def detect_candidates(volume_hu: np.ndarray, lung_mask: np.ndarray, spacing_mm,
                      params: DetectorParams = DetectorParams()) -> list[dict]:
    """Nodule candidates of one series, strongest first.

    Parameters
    ----------
    volume_hu : ndarray, shape (planes, rows, cols)
        The series in HU, planes in ascending z.
    lung_mask : ndarray, same shape
        Nonzero inside the lungs (the preprocessing ``lung_mask`` per slice).
    spacing_mm : sequence of 3 float
        Voxel size (z, row, col), mm.
    params : DetectorParams

    Returns
    -------
    list of dict, highest ``score`` first
        ``plane``, ``row``, ``col`` (float voxel coordinates, sub-voxel),
        ``radius_mm`` (the best scale's radius), ``score`` (the LoG response
        times the square root of the roundness), ``response_hu``,
        ``roundness``, ``peak_hu``.  Empty when the mask is empty.
    """
    volume, mask, spacing = _check(volume_hu, lung_mask, spacing_mm)
    if not mask.any():
        return []
    region = _grown_mask(mask, spacing, params.lung_margin_mm)
    # Work inside the grown lungs' bounding box, padded by the largest kernel's reach: beyond it
    # everything is air either way, so the result is the same at a third of the voxels.
    reach = np.ceil(3.0 * max(params.radii_mm) / math.sqrt(3.0) / spacing).astype(int) + 1
    nonzero = np.argwhere(region)
    low = np.maximum(nonzero.min(axis=0) - reach, 0)
    high = np.minimum(nonzero.max(axis=0) + reach + 1, volume.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    found = _peaks(volume[box], region[box], spacing, params)
    for candidate in found:
        for axis, key in enumerate(("plane", "row", "col")):
            candidate[key] += float(low[axis])
    return _merge(found, spacing, params)


def _peaks(volume: np.ndarray, region: np.ndarray, spacing: np.ndarray,
           params: DetectorParams) -> list[dict]:
    """Every kept LoG peak of one (cropped) volume, unmerged, in that volume's voxel coordinates."""
    # Outside the grown lungs everything is air: the chest wall and the mediastinum are not
    # candidates, and a nodule on the pleura stands out as a lump on the lung's edge.
    work = np.where(region, np.clip(volume, -1000.0, 400.0), -1000.0).astype(np.float32)
    best = np.full(work.shape, -np.inf, dtype=np.float32)
    scale = np.zeros(work.shape, dtype=np.int8)
    smoothed = []
    for k, radius in enumerate(params.radii_mm):
        sigma_mm = radius / math.sqrt(3.0)
        smooth = ndimage.gaussian_filter(work, sigma=sigma_mm / spacing, mode="nearest", truncate=3.0)
        smoothed.append(smooth)
        response = -(sigma_mm ** 2) * sum(_second_derivatives(smooth, spacing))
        better = response > best
        best[better], scale[better] = response[better], k
    peaks = (best == ndimage.maximum_filter(best, size=3, mode="nearest")) & region & (best >= params.min_response_hu)
    found = []
    for point in map(tuple, np.argwhere(peaks)):
        k = int(scale[point])
        smooth = smoothed[k]
        if smooth[point] < params.min_peak_hu:
            continue
        eigen = np.linalg.eigvalsh(_hessian_at(smooth, spacing, point))  # ascending: most negative first
        roundness = float(max(0.0, -eigen[2]) / -eigen[0]) if eigen[0] < 0 else 0.0
        if roundness < params.min_roundness:
            continue
        response = float(best[point])
        plane, row, col = _refine(best, point)
        found.append({"plane": plane, "row": row, "col": col, "radius_mm": params.radii_mm[k],
                      "score": response * math.sqrt(roundness), "response_hu": response, "roundness": roundness,
                      "peak_hu": float(smooth[point])})
    return found


def _merge(found: list[dict], spacing: np.ndarray, params: DetectorParams) -> list[dict]:
    """Strongest first, a peak within reach of a stronger kept one being the same lump; then each band's quota."""
    kept: list[dict] = []
    for candidate in sorted(found, key=lambda c: -c["score"]):
        position = np.array([candidate["plane"], candidate["row"], candidate["col"]]) * spacing
        if all(np.linalg.norm(position - other["_mm"]) >= max(params.merge_mm, other["radius_mm"])
               for other in kept):
            kept.append({**candidate, "_mm": position})
    dense = [c for c in kept if c["peak_hu"] >= params.faint_hu][:params.max_per_series]
    faint = sorted((c for c in kept if c["peak_hu"] < params.faint_hu),
                   key=lambda c: -c["roundness"])[:params.max_faint_per_series]
    chosen = sorted(dense + faint, key=lambda c: -c["score"])
    return [{k: v for k, v in c.items() if k != "_mm"} for c in chosen]


def series_volume(slices: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """HU volume, lung mask and voxel size of one series from its slice rows, in ascending ``slice_index``.

    Each row holds ``pixels`` (int16 little-endian bytes), ``pixel_shape``,
    ``mask`` (uint8 bytes or None for a slice without a valid lung mask),
    ``z_position``, ``image_position``, ``image_orientation``,
    ``pixel_spacing_row`` and ``pixel_spacing_col``.  Returns the volume,
    the mask, ``(z, row, col)`` spacing (median plane step) and the slices'
    :class:`~ctlake.core.patch_geometry.SliceGeometry`.

    Raises
    ------
    InputError
        Slices of different shapes (not one stack).
    """
    ordered = sorted(slices, key=lambda s: s["slice_index"])
    shapes = {tuple(s["pixel_shape"]) for s in ordered}
    if len(shapes) != 1:
        raise InputError(f"slices of one series have different shapes {sorted(shapes)}: not one stack")
    shape = shapes.pop()
    volume = np.stack([np.frombuffer(s["pixels"], "<i2").reshape(shape) for s in ordered])
    mask = np.stack([np.zeros(shape, bool) if s["mask"] is None else np.frombuffer(s["mask"], np.uint8)
                     .reshape(shape).astype(bool) for s in ordered])
    z = np.array([s["z_position"] for s in ordered], dtype=float)
    step = float(np.median(np.abs(np.diff(z)))) if len(z) > 1 else 1.0
    spacing = np.array([step if step > 0 else 1.0, ordered[0]["pixel_spacing_row"],
                        ordered[0]["pixel_spacing_col"]], dtype=float)
    return volume, mask, spacing, [SliceGeometry.from_slice_row(s) for s in ordered]


def world_position(geometries: list, plane: float, row: float, col: float) -> np.ndarray:
    """World mm of a sub-voxel position: the pixel on the two nearest planes, interpolated along z."""
    below = int(np.clip(math.floor(plane), 0, len(geometries) - 1))
    above = min(below + 1, len(geometries) - 1)
    fraction = float(np.clip(plane - below, 0.0, 1.0)) if above > below else 0.0
    return ((1 - fraction) * geometries[below].pixel_to_world(row, col)
            + fraction * geometries[above].pixel_to_world(row, col))


def detect_series(slices: list[dict], params: DetectorParams) -> list[dict]:
    """:func:`detect_candidates` on one series' slice rows, each candidate with its world centre and slice.

    Adds ``rank`` (0 = strongest), ``coord_x/y/z`` (patient mm),
    ``diameter_mm`` and ``slice_index``/``sop_uid``/``frame`` of the nearest
    slice, so every candidate leads back to the slice it was found on.
    """
    volume, mask, spacing, geometries = series_volume(slices)
    ordered = sorted(slices, key=lambda s: s["slice_index"])
    out = []
    for rank, found in enumerate(detect_candidates(volume, mask, spacing, params)):
        x, y, z = world_position(geometries, found["plane"], found["row"], found["col"])
        nearest = ordered[int(np.clip(round(found["plane"]), 0, len(ordered) - 1))]
        out.append({**found, "rank": rank, "coord_x": float(x), "coord_y": float(y), "coord_z": float(z),
                    "diameter_mm": 2 * found["radius_mm"], "slice_index": int(nearest["slice_index"]),
                    "sop_uid": nearest["sop_uid"], "frame": nearest["frame"]})
    return out
