"""Patch geometry for CT slices: world (mm) <-> voxel coordinates, patch cutting, patch samplers.

Pure numpy/OpenCV, no Spark: the patch-extraction pandas UDFs unpack a slice,
call these functions and pack the result.

Coordinate conventions used throughout
--------------------------------------
* **World** coordinates are DICOM patient coordinates (LPS), in mm.
* **Pixel** coordinates are ``(row, col)`` floats in one slice; integer values
  are pixel *centres*, so pixel ``(0, 0)`` is the centre of the first
  transmitted pixel, which is where ``ImagePositionPatient`` points.
* ``ImageOrientationPatient`` holds the row direction (the way the column index
  grows) then the column direction (the way the row index grows).
  ``PixelSpacing[0]`` (``spacing_row``) is the mm between rows, i.e. a step
  along the column direction; ``PixelSpacing[1]`` (``spacing_col``) is the mm
  between columns.
* A slice's **z** is ``dot(ImagePositionPatient, cross(row_dir, col_dir))`` in
  mm, exactly how ingestion fills the ``z_position`` column of ``slices``.
* A **patch** of ``out_px`` pixels maps its pixel ``(out_px // 2, out_px // 2)``
  onto the requested centre; see :func:`patch_to_image_matrix`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from ctlake.errors import ConfigError, InputError

# Normals of slices in one series may differ by DICOM rounding, not by more.
_NORMAL_TOLERANCE = 1e-3

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
}


def _cross(a, b) -> np.ndarray:
    """``np.cross`` of two 3-vectors, the same products in the same order: ``np.cross`` spends about 30 us on
    broadcasting and axis handling, which dominates a cohort's thousands of slice geometries."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]], dtype=float)


@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice's pixel grid sits in patient space.

    Parameters
    ----------
    position : tuple of 3 float
        ``ImagePositionPatient``: world position (mm) of the centre of pixel
        ``(row 0, col 0)``.
    orientation : tuple of 6 float
        ``ImageOrientationPatient``: row direction cosines (direction of
        increasing column index) then column direction cosines (direction of
        increasing row index).
    spacing_row : float
        mm between adjacent rows (``PixelSpacing[0]``).
    spacing_col : float
        mm between adjacent columns (``PixelSpacing[1]``).

    Raises
    ------
    InputError
        Wrong number of values, non-positive spacing, or row and column
        directions that do not span a plane.
    """

    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing_row: float
    spacing_col: float

    def __post_init__(self):
        position = tuple(float(v) for v in np.asarray(self.position, dtype=float).ravel())
        orientation = tuple(float(v) for v in np.asarray(self.orientation, dtype=float).ravel())
        if len(position) != 3 or not np.all(np.isfinite(position)):
            raise InputError(f"position must be 3 finite mm values (ImagePositionPatient), got {self.position!r}")
        if len(orientation) != 6 or not np.all(np.isfinite(orientation)):
            raise InputError(f"orientation must be 6 finite direction cosines, got {self.orientation!r}")
        spacing_row, spacing_col = float(self.spacing_row), float(self.spacing_col)
        if not (spacing_row > 0 and spacing_col > 0):
            raise InputError(f"pixel spacings must be positive mm, got row={self.spacing_row!r}, "
                             f"col={self.spacing_col!r}")
        if np.linalg.norm(_cross(orientation[:3], orientation[3:])) < 0.5:
            raise InputError(f"orientation {orientation} does not hold two roughly orthogonal unit vectors")
        object.__setattr__(self, "position", position)
        object.__setattr__(self, "orientation", orientation)
        object.__setattr__(self, "spacing_row", spacing_row)
        object.__setattr__(self, "spacing_col", spacing_col)

    @classmethod
    def from_slice_row(cls, row) -> SliceGeometry:
        """Build from a mapping with the ``slices`` table's columns.

        Reads ``image_position``, ``image_orientation``, ``pixel_spacing_row``
        and ``pixel_spacing_col`` (a dict, a pandas row or a Spark ``Row``).
        """
        return cls(position=tuple(row["image_position"]), orientation=tuple(row["image_orientation"]),
                   spacing_row=row["pixel_spacing_row"], spacing_col=row["pixel_spacing_col"])

    @property
    def row_direction(self) -> np.ndarray:
        """Unit-ish world direction (3,) in which the column index grows."""
        return np.asarray(self.orientation[:3], dtype=float)

    @property
    def column_direction(self) -> np.ndarray:
        """Unit-ish world direction (3,) in which the row index grows."""
        return np.asarray(self.orientation[3:], dtype=float)

    @cached_property
    def normal(self) -> np.ndarray:
        """``cross(row_direction, column_direction)``, shape (3,), read-only.

        Not renormalised, so ``dot(position, normal)`` equals the ``z_position``
        ingestion stores (cosines are checked to be orthonormal at ingestion).
        Computed once per slice: locating the candidates of a cohort asks for it
        tens of thousands of times.
        """
        normal = _cross(self.orientation[:3], self.orientation[3:])
        normal.flags.writeable = False
        return normal

    @property
    def z(self) -> float:
        """Position of this slice along its normal, mm."""
        return float(np.dot(self.position, self.normal))

    def _in_plane_axes(self) -> np.ndarray:
        # World mm per unit of (col, row): columns step along row_direction.
        return np.stack([self.row_direction * self.spacing_col, self.column_direction * self.spacing_row], axis=1)

    def world_to_pixel(self, xyz) -> tuple[float, float]:
        """Project world point(s) onto this slice's plane, as pixel coordinates.

        Parameters
        ----------
        xyz : array-like, shape (3,) or (n, 3)
            World position(s), mm.

        Returns
        -------
        (row, col) : tuple of float, or of (n,) arrays
            Float pixel coordinates (integer = pixel centre) of the orthogonal
            projection onto the plane. The out-of-plane offset is dropped: use
            :func:`world_to_voxel` to pick the slice first.
        """
        points = np.asarray(xyz, dtype=float)
        if points.shape[-1:] != (3,) or points.ndim > 2:
            raise InputError(f"xyz must have shape (3,) or (n, 3) in mm, got shape {points.shape}")
        axes = self._in_plane_axes()
        offsets = points - np.asarray(self.position)
        # Least squares instead of plain dot products: exact inverse of
        # pixel_to_world even when rounded cosines are not exactly orthonormal.
        col_row = np.linalg.solve(axes.T @ axes, (offsets @ axes).T)
        if points.ndim == 1:
            return float(col_row[1]), float(col_row[0])
        return col_row[1], col_row[0]

    def pixel_to_world(self, row, col) -> np.ndarray:
        """World position (mm) of pixel coordinates ``(row, col)`` on this slice.

        Parameters
        ----------
        row, col : float or array-like
            Pixel coordinates (integer = pixel centre); arrays broadcast.

        Returns
        -------
        np.ndarray
            Shape (3,) for scalars, (..., 3) for arrays.
        """
        row = np.asarray(row, dtype=float)[..., None]
        col = np.asarray(col, dtype=float)[..., None]
        return (np.asarray(self.position) + col * self.spacing_col * self.row_direction
                + row * self.spacing_row * self.column_direction)


def nearest_slice(z_positions: np.ndarray, z: float) -> int:
    """Index of the slice whose position along the normal is nearest to ``z``.

    Parameters
    ----------
    z_positions : array-like of float, shape (n,)
        Slice positions along the normal, mm, in storage order (ascending,
        descending or unsorted).
    z : float
        Query position along the same normal, mm.

    Returns
    -------
    int
        Index into ``z_positions`` (not into a sorted copy); ties go to the
        lower index. A ``z`` beyond the series returns the end slice: compare
        ``abs(z_positions[i] - z)`` with the slice spacing to reject those.

    Raises
    ------
    InputError
        Empty or non-finite input.
    """
    positions = np.asarray(z_positions, dtype=float).ravel()
    if positions.size == 0:
        raise InputError("z_positions is empty: a series needs at least one slice")
    if not (np.all(np.isfinite(positions)) and np.isfinite(z)):
        raise InputError(f"z positions and query must be finite mm, got query {z!r}")
    return int(np.argmin(np.abs(positions - float(z))))  # argmin returns the first minimum


def series_z_positions(geometries: Sequence[SliceGeometry]) -> np.ndarray:
    """Positions (mm) of the slices along the first slice's normal, in the given order.

    Raises
    ------
    InputError
        No slices, or slices whose planes are not parallel (a localizer or a
        second stack mixed into the series).
    """
    if len(geometries) == 0:
        raise InputError("geometries is empty: a series needs at least one slice")
    normal = geometries[0].normal
    for index, geometry in enumerate(geometries):
        if abs(float(np.dot(geometry.normal, normal))) < 1 - _NORMAL_TOLERANCE:
            raise InputError(f"slice {index} has normal {geometry.normal.round(4).tolist()}, not parallel to "
                             f"slice 0's {normal.round(4).tolist()}")
    return np.array([np.dot(g.position, normal) for g in geometries], dtype=float)


def world_to_voxel(xyz, geometries: list[SliceGeometry],
                   z_positions: np.ndarray | None = None) -> tuple[int, float, float]:
    """Voxel coordinates of a world point in a series.

    Parameters
    ----------
    xyz : array-like, shape (3,)
        World position, mm.
    geometries : list of SliceGeometry
        One per slice, in storage order (any z order, any slice spacing).
    z_positions : np.ndarray, optional
        ``series_z_positions(geometries)``, from a caller that locates many
        points in one series: computing it checks every slice's plane, which
        costs far more than locating one point.

    Returns
    -------
    (slice_index, row, col) : tuple of (int, float, float)
        ``slice_index`` indexes ``geometries``: the slice nearest along the
        normal (``z = dot(position, normal)``, ties to the lower index);
        ``row``/``col`` are float pixel coordinates of the point projected
        onto that slice's own plane (so per-slice shifts and gantry offsets
        are honoured).
    """
    point = np.asarray(xyz, dtype=float)
    if point.shape != (3,):
        raise InputError(f"xyz must be one world point of 3 mm values, got shape {point.shape}")
    if z_positions is None:
        z_positions = series_z_positions(geometries)
    index = nearest_slice(z_positions, float(np.dot(point, geometries[0].normal)))
    row, col = geometries[index].world_to_pixel(point)
    return index, row, col


def _check_patch_args(size_mm: float, out_px: int, spacing_rc, interpolation: str) -> tuple[float, float]:
    if not (isinstance(out_px, (int, np.integer)) and out_px >= 1):
        raise ConfigError(f"out_px must be a positive integer number of pixels, got {out_px!r}")
    if not (np.isfinite(size_mm) and size_mm > 0):
        raise ConfigError(f"size_mm must be a positive patch side in mm, got {size_mm!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    spacing = np.asarray(spacing_rc, dtype=float).ravel()
    if spacing.shape != (2,) or not np.all(spacing > 0):
        raise InputError(f"spacing_rc must be two positive mm values (row, col), got {spacing_rc!r}")
    return float(spacing[0]), float(spacing[1])


def patch_to_image_matrix(center_rc: tuple[float, float], size_mm: float, out_px: int,
                          spacing_rc: tuple[float, float]) -> np.ndarray:
    """Affine (2, 3) matrix taking patch pixel ``(r, c, 1)`` to image pixel ``(row, col)``.

    The patch convention, shared by :func:`extract_patch`:

    * ``step_mm = size_mm / out_px`` in both directions, i.e. ``step_mm /
      spacing_rc[0]`` image rows and ``step_mm / spacing_rc[1]`` image columns
      per patch pixel;
    * patch pixel ``(out_px // 2, out_px // 2)`` lands exactly on ``center_rc``:
      ``row = center_r + (r - out_px // 2) * step_mm / spacing_rc[0]`` and
      ``col = center_c + (c - out_px // 2) * step_mm / spacing_rc[1]``.

    Each patch pixel stands for a ``step_mm`` square, so the patch covers
    ``size_mm`` exactly. For odd ``out_px`` it is centred on ``center_rc``;
    for even ``out_px`` it reaches one step further up/left than down/right
    (its geometric centre is half a step up-left of ``center_rc``), the price
    of having a pixel exactly at the centre.

    Parameters
    ----------
    center_rc : (float, float)
        Image pixel coordinates of the patch centre.
    size_mm : float
        Side of the square patch, mm.
    out_px : int
        Side of the patch, pixels.
    spacing_rc : (float, float)
        Image pixel spacing (mm between rows, mm between columns).
    """
    spacing_row, spacing_col = _check_patch_args(size_mm, out_px, spacing_rc, "linear")
    step_mm = size_mm / out_px
    step_r, step_c = step_mm / spacing_row, step_mm / spacing_col
    half = out_px // 2
    center_r, center_c = float(center_rc[0]), float(center_rc[1])
    return np.array([[step_r, 0.0, center_r - half * step_r],
                     [0.0, step_c, center_c - half * step_c]])


def extract_patch(image: np.ndarray, center_rc: tuple[float, float], size_mm: float, out_px: int,
                  spacing_rc: tuple[float, float], pad_value: float, interpolation: str = "linear") -> np.ndarray:
    """Cut a square patch of fixed physical size around a point, resampled to ``out_px`` pixels.

    Resampling and border padding are one ``cv2.warpAffine`` (constant border
    of ``pad_value``), so a candidate at the image edge still gives a full
    ``out_px x out_px`` patch whose outside part is ``pad_value``. The mapping
    is the one of :func:`patch_to_image_matrix`: patch pixel ``(out_px // 2,
    out_px // 2)`` is exactly ``center_rc``, steps are ``size_mm / out_px`` mm.
    A centre on an integer voxel therefore gives a centre pixel equal to that
    voxel ("nearest" and "linear"). There is no anti-aliasing: when a patch
    step is much larger than a pixel, smooth the slice first.

    Parameters
    ----------
    image : np.ndarray, shape (rows, columns)
        One slice, e.g. int16 HU or uint8 windowed.
    center_rc : (float, float)
        Patch centre in image pixel coordinates (integer = pixel centre).
    size_mm : float
        Side of the patch, mm.
    out_px : int
        Side of the output, pixels.
    spacing_rc : (float, float)
        Image pixel spacing (mm between rows, mm between columns); may differ.
    pad_value : float
        Value outside the image (e.g. -1024 HU for air, 0 for uint8).
    interpolation : {"linear", "nearest", "cubic"}

    Returns
    -------
    np.ndarray, shape (out_px, out_px), dtype of ``image``
        Computed in float32 (float64 for float64 input); integer types are
        rounded to nearest and clipped to the dtype's range.
    """
    _check_patch_args(size_mm, out_px, spacing_rc, interpolation)
    source = np.asarray(image)
    if source.ndim != 2 or 0 in source.shape:
        raise InputError(f"image must be one non-empty 2D slice, got shape {source.shape}")
    work_dtype = np.float64 if source.dtype == np.float64 else np.float32
    matrix = patch_to_image_matrix(center_rc, size_mm, out_px, spacing_rc)
    # The matrix is (row, col) -> (row, col); OpenCV works in (x=col, y=row).
    cv_matrix = np.array([[matrix[1, 1], 0.0, matrix[1, 2]],
                          [0.0, matrix[0, 0], matrix[0, 2]]])
    patch = cv2.warpAffine(np.ascontiguousarray(source, dtype=work_dtype), cv_matrix, (out_px, out_px),
                           flags=INTERPOLATIONS[interpolation] | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=float(pad_value))
    return _to_dtype(patch, source.dtype)


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype == np.bool_:
        return values >= 0.5
    return values.astype(dtype, copy=False)


def stack_indices(z_positions: np.ndarray, index: int, offsets: Sequence[int] = (-1, 0, 1)) -> list[int | None]:
    """Slices at ``offsets`` steps from ``index`` along z, for a 2.5D stack.

    Parameters
    ----------
    z_positions : array-like of float, shape (n,)
        Slice positions along the normal, mm, in storage order (any order).
    index : int
        Storage index of the centre slice (e.g. from :func:`nearest_slice`).
    offsets : sequence of int
        Steps along increasing z; ``-1`` is the slice just below.

    Returns
    -------
    list of int or None
        Storage indices in the order of ``offsets`` (channels run along
        increasing z whatever the storage order); ``None`` past a series end.
        Steps count slices, not mm: check the series is complete first.
    """
    positions = np.asarray(z_positions, dtype=float).ravel()
    if not 0 <= index < positions.size:
        raise InputError(f"index {index} is outside a series of {positions.size} slices")
    order = np.argsort(positions, kind="stable")
    rank = int(np.flatnonzero(order == index)[0])
    return [int(order[rank + k]) if 0 <= rank + k < positions.size else None for k in offsets]


def extract_patch_stack(images: list[np.ndarray | None], center_rc, size_mm: float, out_px: int,
                        spacing_rc: tuple[float, float], pad_value: float,
                        interpolation: str = "linear") -> np.ndarray:
    """Cut the same 2D patch from several slices (2.5D), stacked as channels.

    Parameters
    ----------
    images : list of np.ndarray or None
        One slice per channel, e.g. the slices :func:`stack_indices` names;
        ``None`` marks a neighbour missing past a series end, and its channel
        is filled with ``pad_value``.
    center_rc : (float, float) or array-like, shape (channels, 2)
        Patch centre in pixel coordinates: one for all slices (slices share
        their in-plane grid) or one per slice (e.g. from each slice's
        :meth:`SliceGeometry.world_to_pixel` when positions shift per slice).
    size_mm, out_px, spacing_rc, pad_value, interpolation
        As in :func:`extract_patch`.

    Returns
    -------
    np.ndarray, shape (channels, out_px, out_px)
        dtype of the first present slice.
    """
    if len(images) == 0:
        raise InputError("images is empty: a 2.5D stack needs at least one slice")
    present = [image for image in images if image is not None]
    if not present:
        raise InputError("every slice of the 2.5D stack is missing")
    centers = np.asarray(center_rc, dtype=float)
    if centers.shape == (2,):
        centers = np.broadcast_to(centers, (len(images), 2))
    elif centers.shape != (len(images), 2):
        raise InputError(f"center_rc must be (row, col) or one per slice ({len(images)}, 2), got {centers.shape}")
    dtype = np.asarray(present[0]).dtype
    _check_patch_args(size_mm, out_px, spacing_rc, interpolation)
    stack = np.empty((len(images), out_px, out_px), dtype=dtype)
    for channel, (image, center) in enumerate(zip(images, centers)):
        if image is None:
            stack[channel] = _to_dtype(np.full((out_px, out_px), pad_value, dtype=np.float64), dtype)
        else:
            stack[channel] = extract_patch(image, tuple(center), size_mm, out_px, spacing_rc, pad_value,
                                           interpolation)
    return stack


def resample_planes(planes: np.ndarray, z_native, z_target, pad_value: float) -> np.ndarray:
    """Planes at ``z_native`` mm -> planes at ``z_target`` mm, linear along z.

    Turns patches cut from native slices into a volume with isotropic voxels,
    so a 3D shape means the same whatever the scan's slice spacing.  A target
    beyond the first or last native plane is ``pad_value`` (the series ends
    there); one between two planes mixes them by distance, across a missing
    slice too.

    Parameters
    ----------
    planes : np.ndarray, shape (n, rows, cols)
        Native planes, in the order of ``z_native``.
    z_native : array-like of float, shape (n,)
        Strictly increasing positions, mm.
    z_target : array-like of float, shape (m,)
        Wanted positions, mm, any order.
    pad_value : float

    Returns
    -------
    np.ndarray of float32, shape (m, rows, cols)
    """
    planes = np.asarray(planes, dtype=np.float32)
    native = np.asarray(z_native, dtype=float).ravel()
    target = np.asarray(z_target, dtype=float).ravel()
    if planes.ndim != 3 or planes.shape[0] != native.size or native.size == 0:
        raise InputError(f"expected one plane per native z, got {planes.shape} planes for {native.size} positions")
    if np.any(np.diff(native) <= 0):
        raise InputError("native z positions must be strictly increasing")
    out = np.full((target.size,) + planes.shape[1:], pad_value, dtype=np.float32)
    tolerance = 1e-6
    for k, z in enumerate(target):
        if z < native[0] - tolerance or z > native[-1] + tolerance:
            continue
        if native.size == 1:
            out[k] = planes[0]
            continue
        upper = int(np.clip(np.searchsorted(native, z), 1, native.size - 1))
        lower = upper - 1
        weight = float(np.clip((z - native[lower]) / (native[upper] - native[lower]), 0.0, 1.0))
        out[k] = planes[lower] + weight * (planes[upper] - planes[lower])
    return out


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must be 2D (rows, columns), got shape {mask.shape}")
    return mask != 0


def sliding_window_centers(mask: np.ndarray, stride_px: int, window_px: int,
                           min_mask_fraction: float = 0.5) -> np.ndarray:
    """Centres of a regular grid of windows that lie mostly inside a mask.

    The grid is ``window_px // 2 + k * stride_px`` in rows and in columns for
    every such centre inside the image, so the first window is flush with the
    top-left corner and the grid covers the whole slice. The window around
    centre ``(r, c)`` spans rows ``r - window_px // 2`` to ``r - window_px // 2
    + window_px - 1`` (same for columns): the footprint of
    :func:`extract_patch` with ``out_px = window_px`` at 1:1 scale. Pixels
    outside the image count as not set. Window sums come from an integral
    image, O(pixels + windows).

    Parameters
    ----------
    mask : np.ndarray, shape (rows, columns)
        Non-zero where windows may go (e.g. a lung mask).
    stride_px : int
        Grid step, pixels.
    window_px : int
        Window side, pixels.
    min_mask_fraction : float
        Keep a window when at least this fraction of its ``window_px**2``
        pixels is set; 0 keeps the whole grid.

    Returns
    -------
    np.ndarray, shape (n, 2), int64
        ``(row, col)`` centres, row-major order.
    """
    for name, value in (("stride_px", stride_px), ("window_px", window_px)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ConfigError(f"{name} must be a positive integer number of pixels, got {value!r}")
    if not 0 <= min_mask_fraction <= 1:
        raise ConfigError(f"min_mask_fraction must be within [0, 1], got {min_mask_fraction!r}")
    inside = _check_mask(mask)
    rows, cols = inside.shape
    integral = cv2.integral(inside.astype(np.uint8), sdepth=cv2.CV_32S).astype(np.int64)
    half = window_px // 2
    grid_r = np.arange(half, rows, stride_px)
    grid_c = np.arange(half, cols, stride_px)
    r0 = np.clip(grid_r - half, 0, rows)[:, None]
    r1 = np.clip(grid_r - half + window_px, 0, rows)[:, None]
    c0 = np.clip(grid_c - half, 0, cols)[None, :]
    c1 = np.clip(grid_c - half + window_px, 0, cols)[None, :]
    counts = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    keep = counts >= min_mask_fraction * window_px * window_px
    keep_r, keep_c = np.nonzero(keep)  # row-major
    return np.stack([grid_r[keep_r], grid_c[keep_c]], axis=1).astype(np.int64)
