"""Per-slice patch tasks: pure Python that turns one slice (plus neighbours) into patches.

A *slice task* carries one slice's HU pixels, its neighbours for 2.5D, its
lung mask, and what to cut from it: explicit centres (candidates), a number of
random negatives with the nodules to stay away from, or a sliding window.
Cutting all patches of a slice in one place means a slice is decoded once and
held once, however many patches come from it, and a Python worker never holds
more than one slice stack at a time.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from ctlake.core.patch_geometry import extract_patch_stack, resample_planes, sample_negatives, sliding_window_centers
from ctlake.errors import InputError

#: Hounsfield units of air: what a patch is padded with beyond the image.
PAD_HU = -1000.0


@dataclass(frozen=True)
class PatchParams:
    """Physical patch size (mm), output size (pixels) and depth.

    ``depth_mm > 0`` makes every patch a volume: ``planes(params)`` planes
    ``size_mm / out_px`` mm apart (isotropic voxels), centred on the slice and
    interpolated between native slices.  Otherwise ``neighbours`` native
    slices on each side give a 2.5D stack (0: 2D).
    """

    size_mm: float = 32.0
    out_px: int = 32
    neighbours: int = 0
    depth_mm: float = 0.0
    negative_margin_mm: float = 10.0
    window_stride_mm: float = 16.0
    window_min_mask_fraction: float = 0.5


def plane_offsets_mm(params: PatchParams) -> np.ndarray:
    """z offsets (mm) of a volume patch's planes from its centre slice, ascending."""
    step = params.size_mm / params.out_px
    half = int(round(params.depth_mm / 2 / step))
    return np.arange(-half, half + 1) * step


def patch_id(series_uid: str, slice_index: int, row: float, col: float, mode: str, params_hash: str) -> str:
    """Stable id of a patch: the same request under the same parameters is the same patch."""
    text = f"{series_uid}|{slice_index}|{row:.3f}|{col:.3f}|{mode}|{params_hash}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cut_slice_task(stack: list[np.ndarray | None], spacing_rc: tuple[float, float], params: PatchParams,
                   requests: list[dict], mask: np.ndarray | None = None, n_negatives: int = 0,
                   exclusions: list[dict] | None = None, window: bool = False, seed: int = 0,
                   z_positions: list[float] | None = None, centre_z: float | None = None) -> list[dict]:
    """All patches of one slice task.

    Parameters
    ----------
    stack : list of ndarray or None
        HU slices ``k - neighbours .. k + neighbours``; None where the series ends.
        For volume patches (``params.depth_mm > 0``): the slices present
        around ``k``, ascending z, at ``z_positions`` mm; ``centre_z`` is slice ``k``'s.
    spacing_rc : (float, float)
        Pixel spacing (row, column) of the slice, mm.
    requests : list of dict
        Explicit centres: ``row``, ``col`` (pixels) plus any fields to carry along
        (candidate id, label, mode).
    mask : ndarray or None
        The slice's lung mask (0/1), needed for negatives and windows.
    n_negatives : int
        Random negatives to draw inside the mask, away from ``exclusions``
        (dicts with ``row``, ``col``, ``radius_px``) by ``params.negative_margin_mm``.
    window : bool
        Also cut a sliding window over the mask.
    seed : int
        Seed of this slice's negative sampling, so a re-run draws the same points.

    Returns
    -------
    list of dict
        One dict per patch: the request fields, ``row``/``col`` centre, ``mode``
        and ``patch`` (float HU array, shape (channels, out_px, out_px) cast to int16).
    """
    if params.depth_mm > 0 and (z_positions is None or centre_z is None or len(z_positions) != len(stack)):
        raise InputError("volume patches need the z position of every slice of the stack and of the centre")
    tasks = [dict(r) for r in requests]
    pixel_mm = min(spacing_rc)
    if n_negatives and mask is not None:
        excl = exclusions or []
        centres = np.array([[e["row"], e["col"]] for e in excl], dtype=float).reshape(-1, 2)
        radii = np.array([e["radius_px"] for e in excl], dtype=float)
        points = sample_negatives(mask, n_negatives, centres, radii, params.negative_margin_mm / pixel_mm,
                                  np.random.default_rng(seed))
        tasks += [{"row": float(r), "col": float(c), "mode": "negative", "label": 0} for r, c in points]
    if window and mask is not None:
        stride = max(1, int(round(params.window_stride_mm / pixel_mm)))
        size_px = max(1, int(round(params.size_mm / pixel_mm)))
        for r, c in sliding_window_centers(mask, stride, size_px, params.window_min_mask_fraction):
            tasks.append({"row": float(r), "col": float(c), "mode": "window", "label": None})
    patches = []
    for task in tasks:
        patch = extract_patch_stack(stack, (task["row"], task["col"]), params.size_mm, params.out_px,
                                    spacing_rc, PAD_HU)
        if params.depth_mm > 0:
            patch = np.rint(resample_planes(patch, z_positions, centre_z + plane_offsets_mm(params), PAD_HU))
        patches.append({**task, "patch": patch.astype(np.int16)})
    return patches
