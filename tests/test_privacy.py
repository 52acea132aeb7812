"""A folder tree named like a patient, ingested by the real job: the name is nowhere it writes.

Receivers name folders after patients (dcmtk ``storescp --sort-on-patientname``,
``<patientName>/<patientId>`` policies).  The job runs as an operator runs it (a
process, Spark's event log on), and every table, Delta log, Parquet footer and
statistic, log line and event log line is searched for every part of the name.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dicom_files import build_hostile_folder, real

ROOT = Path(__file__).resolve().parents[1]
PATIENT_FOLDER = "ROE_JANE_19010203_MRN00000042"
#: Every part of the folder name someone could search for.
IDENTITY = ("ROE_JANE", "ROE", "JANE", "19010203", "MRN00000042", "00000042")


def patient_named_tree(root: Path) -> Path:
    """incoming/ROE_JANE_.../<accession>/ with CT, a duplicate, a truncated file, noise and a hostile file."""
    study = root / "incoming" / PATIENT_FOLDER / "ACC_ROE_JANE_0001"
    study.mkdir(parents=True)
    shutil.copy(real("CT_small.dcm"), study / "ROE_JANE_1.dcm")
    shutil.copy(real("CT_small.dcm"), study / "ROE_JANE_2.dcm")          # duplicate: its message names the other
    shutil.copy(real("693_J2KR.dcm"), study / "ROE_JANE_3.dcm")
    content = real("693_UNCI.dcm").read_bytes()
    (study / "ROE_JANE_4.dcm").write_bytes(content[: len(content) // 2])  # truncated
    (study / "ROE_JANE_notes.txt").write_text("not an image")
    build_hostile_folder(study / "ROE_JANE_hostile", zeros_bytes=1024)
    return root / "incoming"


def texts_under(folder: Path) -> list[tuple[str, str]]:
    """(file, text) for every file a search could read: raw bytes, and every value of every Parquet file.

    Parquet pages are compressed, so a byte search alone could miss a value;
    the footer (with its min/max statistics) is not, and is read both ways.
    """
    found = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix in (".zstd", ".lz4"):  # Spark's rolling event log is compressed
            with pa.CompressedInputStream(str(path), path.suffix[1:]) as stream:
                found.append((str(path), stream.read().decode("latin-1")))
            continue
        found.append((str(path), path.read_bytes().decode("latin-1")))
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            found.append((f"{path} (footer)", str(parquet.metadata.to_dict())))
            table = parquet.read()
            found.append((f"{path} (values)", json.dumps(
                [table.column(i).to_pylist() for i, f in enumerate(table.schema)
                 if str(f.type) in ("string", "large_string") or "list<" in str(f.type)], default=str)))
    return found


@pytest.mark.parametrize("mode", [[], ["--stream"]], ids=["batch", "stream"])
def test_a_patient_named_folder_reaches_no_table_log_statistic_or_event_log(tmp_path, mode):
    """Streaming too: its queue of paths is restricted, and its rows travel as data, never in a plan."""
    incoming = patient_named_tree(tmp_path)
    warehouse, restricted, events = tmp_path / "warehouse", tmp_path / "restricted", tmp_path / "events"
    events.mkdir()
    result = subprocess.run(
        [sys.executable, "jobs/ingest.py", "--input", str(incoming), "--set", f"warehouse={warehouse}",
         "--set", f"privacy.restricted_warehouse={restricted}", "--set", "spark.conf.spark.eventLog.enabled=true",
         "--set", f"spark.conf.spark.eventLog.dir={events}", "--set", "spark.conf.spark.ui.enabled=true",
         "--set", "spark.conf.spark.executorEnv.CTLAKE_PSEUDONYM_KEY=" + "s" * 40, *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CTLAKE_PSEUDONYM_KEY": "s" * 40})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["files_ingested"] == 2 and summary["quarantined"]["duplicate"] == 1
    assert summary["accounted_for"] and len(list(events.rglob("events_*"))) == 1
    searched = [("stdout", result.stdout), ("stderr", result.stderr), *texts_under(warehouse), *texts_under(events)]
    # The search read every table's log and data files, and the event log.
    read = {Path(where.split(" (")[0]) for where, _ in searched[2:]}
    assert {p.relative_to(warehouse).parts[0] for p in read if p.is_relative_to(warehouse)} >= {
        "slices", "series", "quarantine", "ingest_runs"}
    assert sum(p.suffix == ".parquet" for p in read) >= 4 and any(p.is_relative_to(events) for p in read)
    leaks = sorted({(where, part) for where, text in searched for part in IDENTITY if part in text})
    assert not leaks, leaks[:10]
    assert not [where for where, text in searched if "s" * 40 in text]
    # The restricted map, outside the warehouse, is the one place the paths are.
    assert any(PATIENT_FOLDER in text for _, text in texts_under(restricted))
