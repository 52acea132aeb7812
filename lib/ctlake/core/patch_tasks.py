"""Per-slice patch tasks: pure Python that turns one slice (plus neighbours) into patches.

A *slice task* carries one slice's HU pixels, its neighbours for 2.5D, its
lung mask, and what to cut from it: explicit centres (candidates and
annotated nodules) or a sliding window.
Cutting all patches of a slice in one place means a slice is decoded once and
held once, however many patches come from it, and a Python worker never holds
more than one slice stack at a time.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ctlake.core.dicom_parse import hu_frame
from ctlake.core.patch_geometry import (
    SliceGeometry,
    extract_patch_stack,
    resample_planes,
    series_z_positions,
    sliding_window_centers,
    world_to_voxel,
)
from ctlake.errors import InputError

#: Hounsfield units of air: what a patch is padded with beyond the image.
PAD_HU = -1000.0
#: Patches cut at annotated nodules: their centres, and displaced copies (training only).
ANNOTATED_MODES = ("nodule", "jittered")
#: What the models learn from: the detector's candidates and the annotated nodules.
TRAINING_MODES = ("detected", *ANNOTATED_MODES)


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
    window_stride_mm: float = 16.0
    window_min_mask_fraction: float = 0.5
    jitter_copies: int = 0
    jitter_fraction: float = 0.0


def jittered_nodules(nodules: pd.DataFrame, copies: int, fraction: float) -> pd.DataFrame:
    """Each annotated nodule at ``copies`` centres displaced the way the detector misplaces it.

    The detector's candidate on a nodule lies off the annotated centre by an
    amount that grows with the nodule (on the default cohort: median 0.06,
    90th percentile 0.17 of the diameter), and the models see that candidate
    when they score a scan.  Training also on displaced copies teaches them
    what a nodule looks like from where the detector will stand.  The offset
    is normal per axis with standard deviation ``fraction`` x diameter, drawn
    from a generator seeded by the nodule's key, so a rerun cuts the same
    patches.

    Parameters
    ----------
    nodules : DataFrame
        ``candidate_id`` (the nodule's key), ``coordX/Y/Z`` (mm), ``diameter_mm``
        and any other columns, which the copies keep.
    copies, fraction : int, float
        Copies per nodule and the offset's scale relative to the diameter.

    Returns
    -------
    DataFrame
        ``copies`` rows per nodule with displaced ``coordX/Y/Z``.
    """
    rows = []
    for nodule in nodules.to_dict("records"):
        seed = int.from_bytes(hashlib.sha256(nodule["candidate_id"].encode()).digest()[:8], "little")
        offsets = np.random.default_rng(seed).normal(0.0, fraction * nodule["diameter_mm"], (copies, 3))
        for dx, dy, dz in offsets:
            rows.append({**nodule, "coordX": nodule["coordX"] + dx, "coordY": nodule["coordY"] + dy,
                         "coordZ": nodule["coordZ"] + dz})
    return pd.DataFrame(rows, columns=nodules.columns)


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
                   requests: list[dict], mask: np.ndarray | None = None, window: bool = False,
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
        The slice's lung mask (0/1), needed for windows.
    window : bool
        Also cut a sliding window over the mask.

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


def locate_candidates(candidates: pd.DataFrame, slices: pd.DataFrame) -> list[dict]:
    """One series' candidates (patient mm) on their nearest slices: slice index, (row, col) and distance.

    Parameters
    ----------
    candidates : DataFrame
        ``series_uid``, ``coordX/Y/Z`` (mm), ``radius_mm``, ``mode``, ``label``, ``candidate_id``.
    slices : DataFrame
        The series' slices: ``slice_index``, ``z_position`` (mm along the normal),
        ``image_position``, ``image_orientation``, ``pixel_spacing_row/col``.

    Returns
    -------
    list of dict
        Per candidate: ``slice_index``, ``distance_mm`` (from that slice along
        the normal), ``z_mm``, ``row``/``col`` (pixels) and the candidate's own fields.
    """
    if candidates.empty or slices.empty:
        return []
    slices = slices.sort_values("slice_index")
    geometries = [SliceGeometry(tuple(p), tuple(o), float(sr), float(sc)) for p, o, sr, sc in
                  zip(slices["image_position"], slices["image_orientation"], slices["pixel_spacing_row"],
                      slices["pixel_spacing_col"])]
    indices = slices["slice_index"].to_numpy()
    z_positions = slices["z_position"].to_numpy()
    along_normal = series_z_positions(geometries)
    rows = []
    for cand in candidates.itertuples(index=False):
        xyz = (cand.coordX, cand.coordY, cand.coordZ)
        position, row, col = world_to_voxel(xyz, geometries, along_normal)
        z_mm = float(np.dot(np.asarray(xyz), geometries[position].normal))
        rows.append({"series_uid": cand.series_uid, "slice_index": int(indices[position]),
                     "distance_mm": abs(z_mm - float(z_positions[position])), "radius_mm": cand.radius_mm,
                     "z_mm": z_mm, "row": row, "col": col, "mode": cand.mode, "label": cand.label,
                     "candidate_id": cand.candidate_id, "coord_x": cand.coordX, "coord_y": cand.coordY,
                     "coord_z": cand.coordZ})
    return rows


def patch_geometry(params: PatchParams) -> dict:
    """What a patch looks like (not how many are cut): a model is only valid on patches of its geometry."""
    return {"size_mm": params.size_mm, "out_px": params.out_px, "neighbours": params.neighbours,
            "depth_mm": params.depth_mm}


def params_hash(params: PatchParams) -> str:
    """Short hash of every cutting parameter: it keys the ``patches`` rows cut under them."""
    return hashlib.sha256(json.dumps(asdict(params), sort_keys=True).encode()).hexdigest()[:12]


def task_patches(task: dict, params: PatchParams) -> list[dict]:
    """One slice task (a row of ``ctlake.spark.patches.slice_stacks`` joined with its task) -> its patches.

    For volume patches ``task["stack"]`` holds the slices around the task's slice
    (``offset`` from it), as :func:`volume_tasks` builds them.
    """
    by_offset = {s["offset"]: s for s in task["stack"]}
    shape = tuple(by_offset[0]["pixel_shape"])
    if params.depth_mm > 0:
        present = []
        for offset in sorted(by_offset):
            # Planes must rise strictly in z: a second frame at a slice's position adds nothing.
            if by_offset[offset]["pixels"] is not None and (
                    not present or by_offset[offset]["z_position"] > present[-1]["z_position"]):
                present.append(by_offset[offset])
        stack = [hu_frame(s["pixels"], s["pixel_shape"]) for s in present]
        z_positions, centre_z = [s["z_position"] for s in present], by_offset[0]["z_position"]
    else:
        stack = [hu_frame(by_offset[o]["pixels"], by_offset[o]["pixel_shape"])
                 if o in by_offset and by_offset[o]["pixels"] is not None else None
                 for o in range(-params.neighbours, params.neighbours + 1)]
        z_positions = centre_z = None
    mask = np.frombuffer(task["mask"], np.uint8).reshape(shape) if task["mask"] is not None else None
    requests = [dict(r) for r in (task["requests"] if task["requests"] is not None else [])]
    return cut_slice_task(stack, (task["pixel_spacing_row"], task["pixel_spacing_col"]), params, requests, mask,
                          bool(task["window"]), z_positions, centre_z)


def volume_tasks(series_row: dict, params: PatchParams) -> Iterator[dict]:
    """The slice tasks of one ``ctlake.spark.patches.series_volumes`` row, each with the stack :func:`task_patches` expects."""
    slices = sorted(series_row["slices"], key=lambda s: s["slice_index"])
    positions = np.array([s["z_position"] for s in slices], dtype=float)
    index_of = {s["slice_index"]: i for i, s in enumerate(slices)}
    half = params.depth_mm / 2
    for task in series_row["tasks"]:
        task = {**task, "series_uid": series_row["series_uid"]}
        centre = index_of[task["slice_index"]]
        # The planes reach depth_mm / 2 each side: take every slice up to one beyond that.
        low = max(0, int(np.searchsorted(positions, positions[centre] - half, side="left")) - 1)
        high = min(len(slices), int(np.searchsorted(positions, positions[centre] + half, side="right")) + 1)
        task["stack"] = [{**slices[i], "offset": slices[i]["slice_index"] - task["slice_index"]}
                         for i in range(low, high)]
        yield task


def row_tasks(row: dict, params: PatchParams) -> Iterator[dict]:
    """The slice tasks of one ``ctlake.spark.patches.job_frame`` row, ready for :func:`task_patches`."""
    return volume_tasks(row, params) if params.depth_mm > 0 else iter([row])
