"""One synthetic patient written to disk: its DICOM series and its rows of the cohort's CSVs.

Output layout under ``output``::

    dicom/patient_NNNN/<SeriesInstanceUID>/NNNN.dcm   one CT series per patient
    annotations.csv   seriesuid,coordX,coordY,coordZ,diameter_mm          (LUNA16)
    candidates.csv    seriesuid,coordX,coordY,coordZ,class                 (LUNA16)
    labels.csv        seriesuid,label,n_nodules,n_malignant,n_benign,n_indeterminate
    nodules.csv       one row per nodule with its ratings and LIDC source
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from ctlake.cohort import dicom_writer, identity, lidc, render
from ctlake.cohort.plan import PatientSpec

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
LABEL_COLUMNS = ("seriesuid", "label", "n_nodules", "n_malignant", "n_benign", "n_indeterminate")
NODULE_COLUMNS = ("seriesuid", "nodule_id", "coordX", "coordY", "coordZ", "diameter_mm", "n_readers",
                  "malignancy_mean", "label", "subtlety", "internal_structure", "calcification", "sphericity",
                  "margin", "lobulation", "spiculation", "texture", "lidc_scan_id", "lidc_annotation_ids")


def generate_patient(spec: PatientSpec, output: str | Path) -> dict:
    """Render one patient, write its series under ``output/dicom`` and return its CSV rows.

    Pure apart from the files it writes; an executor calls it once per patient.
    """
    rendered = render.render_patient(spec)
    person = identity.fake_identity(np.random.default_rng([spec.seed, spec.index, 7]))
    uids = dicom_writer.series_uids("ctlake-cohort", spec.seed, spec.index, spec.scan_id, spec.matrix,
                             len(spec.z_positions))
    series_uid = uids["SeriesInstanceUID"]
    folder = Path(output) / "dicom" / f"patient_{spec.index:04d}" / series_uid
    files = dicom_writer.write_series(rendered.volume, rendered.grid, spec.z_positions, spec.slice_thickness,
                               person, uids, folder, rle=spec.rle)
    labels = Counter(n.spec.label for n in rendered.nodules)
    nodules = []
    for placed in rendered.nodules:
        ratings = placed.spec.ratings
        nodules.append({
            "seriesuid": series_uid, "nodule_id": placed.spec.nodule_id,
            "coordX": placed.x, "coordY": placed.y, "coordZ": placed.z, "diameter_mm": placed.diameter_mm,
            "n_readers": placed.spec.n_readers, "malignancy_mean": placed.spec.malignancy_mean,
            "label": placed.spec.label,
            **{name: ratings[name] for name in lidc.RATINGS if name != "malignancy"},
            "lidc_scan_id": spec.scan_id,
            "lidc_annotation_ids": ";".join(str(a) for a in placed.spec.annotation_ids),
        })
    return {
        "index": spec.index,
        "seriesuid": series_uid,
        "files": len(files),
        "rle": spec.rle,
        "label": {"seriesuid": series_uid, "label": int(labels["malignant"] > 0),
                  "n_nodules": len(rendered.nodules), "n_malignant": labels["malignant"],
                  "n_benign": labels["benign"], "n_indeterminate": labels["indeterminate"]},
        "nodules": nodules,
        "candidates": [{"seriesuid": series_uid, "coordX": x, "coordY": y, "coordZ": z, "class": c}
                       for x, y, z, c in rendered.candidates],
    }


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_csv(path: Path, columns: tuple, rows: list[dict]) -> None:
    """Write rows with fixed column order and 3-decimal floats, so re-runs are byte-identical."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row[c]) for c in columns])


def write_tables(results: list[dict], output: Path) -> None:
    """The four CSVs from the per-patient results, in patient order."""
    results = sorted(results, key=lambda r: r["index"])
    nodules = [n for r in results for n in r["nodules"]]
    write_csv(output / "annotations.csv", ANNOTATION_COLUMNS, nodules)
    write_csv(output / "candidates.csv", CANDIDATE_COLUMNS, [c for r in results for c in r["candidates"]])
    write_csv(output / "labels.csv", LABEL_COLUMNS, [r["label"] for r in results])
    write_csv(output / "nodules.csv", NODULE_COLUMNS, nodules)
