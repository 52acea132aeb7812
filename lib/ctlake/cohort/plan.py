"""Driver-side planning of the cohort: which LIDC scan and which nodules each patient gets.

Planning only reads the small sqlite database and makes seeded choices, so it
runs on the driver; the resulting :class:`PatientSpec` objects carry
everything an executor needs (geometry, consensus masks, ratings) and are
rendered without access to the database.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctlake.cohort import lidc
from ctlake.errors import InputError


@dataclass(frozen=True)
class CohortSettings:
    """What to generate.

    Parameters
    ----------
    patients : int
        Number of synthetic patients (one series each).
    slices : int
        Consecutive real slice positions per patient.
    matrix : int
        Rows and columns of each written image; the field of view of the LIDC
        scan is kept, so the pixel spacing is ``spacing * 512 / matrix`` mm.
    seed : int
        Seed of every random choice; the same settings give byte-identical files.
    no_nodule_fraction : float
        Fraction of patients rendered without nodules (from LIDC scans without annotations).
    rle_fraction : float
        Fraction of patients whose files are written RLE Lossless instead of uncompressed.
    consensus_level : float
        Fraction of readers that must include a voxel in the nodule mask.
    require_rated_nodule : bool
        Skip scans whose nodules in the slab are all indeterminate, so every
        patient with nodules carries at least one malignant or benign one
        (more usable training labels per generated patient).
    """

    patients: int
    slices: int
    matrix: int
    seed: int
    no_nodule_fraction: float = 0.25
    rle_fraction: float = 0.0
    consensus_level: float = 0.5
    require_rated_nodule: bool = False


@dataclass(frozen=True)
class NoduleSpec:
    """One real LIDC nodule to render: its readers' consensus mask and ratings.

    ``mask`` is the consensus in the original 512 x 512 grid, cropped; its
    first plane is slab slice ``first_slice`` and its corner is pixel
    (``row0``, ``col0``).  ``ratings`` are the readers' medians.
    """

    nodule_id: int
    annotation_ids: tuple
    n_readers: int
    malignancy_mean: float
    label: str
    ratings: dict
    mask: np.ndarray
    first_slice: int
    row0: int
    col0: int


@dataclass(frozen=True)
class PatientSpec:
    """Everything needed to render and write one synthetic patient, picklable for executors.

    ``z_positions`` are the slab's real LIDC slice positions (mm, ascending);
    ``pixel_spacing`` is the LIDC scan's in-plane spacing (mm) at 512 x 512.
    """

    index: int
    seed: int
    matrix: int
    scan_id: int
    lidc_patient_id: str
    pixel_spacing: float
    slice_thickness: float
    z_positions: np.ndarray
    rle: bool
    nodules: tuple

    @property
    def spacing_mm(self) -> float:
        """In-plane pixel spacing of the written images: the LIDC field of view over ``matrix``."""
        return self.pixel_spacing * lidc.LIDC_MATRIX / self.matrix


def choose_slab(n_positions: int, extents: list[tuple[int, int]], slices: int) -> tuple[int, list[int]]:
    """First slice index of the window of ``slices`` positions holding the most whole nodules.

    ``extents`` are each nodule's (first, last) slice index.  Among windows
    with the most nodules entirely inside, the one whose centre is nearest the
    nodules' mean centre wins (nodules away from the slab edges), then the
    lowest start.  Returns the start and the indices of the nodules inside;
    with no nodule inside any window the start is 0 and the list empty.
    """
    best_key, best = None, (0, [])
    for start in range(n_positions - slices + 1):
        stop = start + slices - 1
        inside = [i for i, (first, last) in enumerate(extents) if first >= start and last <= stop]
        if not inside:
            continue
        centre = float(np.mean([(extents[i][0] + extents[i][1]) / 2 for i in inside]))
        key = (-len(inside), abs(start + (slices - 1) / 2 - centre), start)
        if best_key is None or key < best_key:
            best_key, best = key, (start, inside)
    return best


def scan_nodules(annotations: list[lidc.Annotation], scan: lidc.Scan, level: float) -> list[NoduleSpec]:
    """The scan's nodules (clustered readers, consensus mask, median ratings, label), slice indices in the scan."""
    nodules = []
    for cluster in lidc.cluster_annotations(annotations, scan.pixel_spacing):
        consensus = lidc.consensus_mask(cluster, scan.z_positions, level)
        if consensus is None:
            continue
        mean_malignancy = float(np.mean([a.ratings["malignancy"] for a in cluster]))
        nodules.append(NoduleSpec(
            nodule_id=len(nodules) + 1,
            annotation_ids=tuple(a.annotation_id for a in cluster),
            n_readers=len(cluster),
            malignancy_mean=mean_malignancy,
            label=lidc.malignancy_label(mean_malignancy),
            ratings=lidc.median_ratings(cluster),
            mask=consensus.mask,
            first_slice=consensus.first_slice,
            row0=consensus.row0,
            col0=consensus.col0,
        ))
    return nodules


def plan_cohort(db_path: str | Path, settings: CohortSettings) -> list[PatientSpec]:
    """Choose a scan, a slab and its nodules for every patient, deterministically from the seed.

    Scans with nodules and scans without annotations are drawn in two seeded
    permutations, at most one scan per real LIDC patient: two synthetic
    patients from one real patient share nodules, and could land on both sides
    of a train/test split.  A scan none of whose nodules fits in a slab is
    skipped; a cohort larger than the distinct patients available is an
    InputError, not a silent repeat.  Patients are shuffled so the index says nothing about
    the label.
    """
    rng = np.random.default_rng([settings.seed, 0x91A4])
    conn = lidc.connect(db_path)
    try:
        scans = [s for s in lidc.read_scans(conn) if len(s.z_positions) >= settings.slices]
        if not scans:
            raise InputError(f"no LIDC scan has {settings.slices} slices; lower cohort.slices")
        annotated = lidc.annotated_scan_ids(conn)
        with_nodules = [s for s in scans if s.scan_id in annotated]
        without = [s for s in scans if s.scan_id not in annotated] or with_nodules
        n_empty = round(settings.patients * settings.no_nodule_fraction)
        n_nodule = settings.patients - n_empty

        planned: list[tuple[lidc.Scan, int, list[NoduleSpec]]] = []
        used: set[str] = set()
        for k in rng.permutation(len(with_nodules)):
            if len(planned) == n_nodule:
                break
            scan = with_nodules[k]
            if scan.lidc_patient_id in used:
                continue
            nodules = scan_nodules(lidc.read_annotations(conn, scan.scan_id), scan, settings.consensus_level)
            extents = [(n.first_slice, n.first_slice + n.mask.shape[0] - 1) for n in nodules]
            start, inside = choose_slab(len(scan.z_positions), extents, settings.slices)
            if not inside:
                continue
            kept = [nodules[i] for i in inside]
            if settings.require_rated_nodule and all(n.label == "indeterminate" for n in kept):
                continue
            kept = [NoduleSpec(**{**n.__dict__, "nodule_id": k + 1, "first_slice": n.first_slice - start})
                    for k, n in enumerate(kept)]
            planned.append((scan, start, kept))
            used.add(scan.lidc_patient_id)
        if len(planned) < n_nodule:
            raise InputError(f"only {len(planned)} distinct LIDC patients have a nodule that fits in "
                             f"{settings.slices} slices; {n_nodule} are needed: lower cohort.patients")
        empty = [without[k] for k in rng.permutation(len(without)) if without[k].lidc_patient_id not in used]
        if len(empty) < n_empty:
            raise InputError(f"only {len(empty)} distinct LIDC patients without nodules are left; {n_empty} "
                             "are needed: lower cohort.patients or cohort.no_nodule_fraction")
        for scan in empty[:n_empty]:
            start = int(rng.integers(0, len(scan.z_positions) - settings.slices + 1))
            planned.append((scan, start, []))
    finally:
        conn.close()

    specs = []
    for index, k in enumerate(rng.permutation(len(planned)), start=1):
        scan, start, nodules = planned[k]
        rle = bool(np.random.default_rng([settings.seed, index, 4]).random() < settings.rle_fraction)
        specs.append(PatientSpec(
            index=index, seed=settings.seed, matrix=settings.matrix, scan_id=scan.scan_id,
            lidc_patient_id=scan.lidc_patient_id, pixel_spacing=scan.pixel_spacing,
            slice_thickness=scan.slice_thickness,
            z_positions=scan.z_positions[start:start + settings.slices].copy(),
            rle=rle, nodules=tuple(nodules)))
    return specs
