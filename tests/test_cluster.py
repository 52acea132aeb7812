"""Jobs on a real standalone Spark cluster: a master and two one-core workers from the installed pyspark.

Executors there are separate JVMs whose Python is the packaged environment
(``make package``: a venv-pack archive Spark unpacks in each executor's work
folder), not the test's own.  This catches what local mode hides: closures
that do not pickle, jars only the driver sees, a dependency missing from the
archive, and work lost or repeated when a worker dies.
"""
import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import ROOT
from dicom_files import build_mixed_folder, real
from pydicom.uid import generate_uid

from ctlake.spark import cluster

ARCHIVE = ROOT / "dist" / "ctlake-env.tar.gz"
KEY = "c" * 32


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """Two workers of one core and 2 GB each, registered with their master; stopped by pid afterwards."""
    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is missing: `make test` builds it (make package)")
    folder = tmp_path_factory.mktemp("cluster")
    state = cluster.start(folder, workers=2, cores=1, memory="2g")
    try:
        yield state
    finally:
        stopped = {s.pid for s in cluster.stop(folder)}
        assert not any(cluster._running(s) for s in state.servers), "a cluster process outlived the fixture"
        assert stopped <= {s.pid for s in state.servers}


def job_command(job: str, master: str, tmp_path: Path, *sets: str) -> list[str]:
    """``make submit``'s command: the job's driver here, its executors on the cluster with the archive's Python."""
    command = [sys.executable, f"jobs/{job}.py", "--set", f"spark.master={master}",
               "--set", f"spark.conf.spark.archives={ARCHIVE}#environment",
               "--set", "spark.executor_python=./environment/bin/python",
               "--set", f"warehouse={tmp_path / 'warehouse'}", "--set", f"spark.event_log_dir={tmp_path / 'events'}",
               "--set", "spark.conf.spark.executor.memory=1g", "--set", "ingest.progress_seconds=1",
               "--set", f"privacy.restricted_warehouse={tmp_path / 'restricted'}"]
    for item in sets:
        command += ["--set", item]
    return command


def job_env() -> dict:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "CTLAKE_PSEUDONYM_KEY": KEY}
    env.pop("PYSPARK_PYTHON", None)
    return env


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ingest_runs_on_the_cluster_from_the_packaged_environment(standalone, tmp_path):
    expected = build_mixed_folder(tmp_path / "input")
    result = subprocess.run(job_command("ingest", standalone.master_url, tmp_path, f"ingest.input={tmp_path / 'input'}"),
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=job_env())
    summary = summary_of(result)
    assert summary["status"] == "succeeded"
    assert summary["files_seen"] == len(expected) and summary["accounted_for"]
    assert summary["slices_written"] == 6
    assert summary["quarantined"]["duplicate"] == 2
    # The executors' Python came out of the archive, unpacked in each executor's work folder: ctlake from
    # the wheel, not this checkout.
    unpacked = glob.glob(f"{standalone.folder}/work-*/app-*/*/environment/lib/python3*/site-packages/ctlake/__init__.py")
    assert unpacked, "no executor unpacked the environment archive"
    # Standard output holds the summary alone; log lines went to standard error.
    assert "ctlake.ingest: " in result.stderr and "ctlake.ingest: " not in result.stdout


def _copies_of_a_real_ct(folder: Path, count: int) -> None:
    """``count`` JPEG 2000 512x512 CT slices (real pixels, new SOP instances): seconds of decoding per core."""
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(real("693_J2KR.dcm"))
    series = generate_uid(entropy_srcs=["kill-a-worker"])
    for index in range(count):
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["kill-a-worker", str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.save_as(folder / f"slice_{index:04d}.dcm", enforce_file_format=False)


def _running_tasks(folder: str) -> int:
    """Tasks the cluster's executors have started so far, from their logs in the workers' work folders."""
    return sum(Path(log).read_text(errors="replace").count("Running task")
               for log in glob.glob(f"{folder}/work-*/app-*/*/stderr"))


def test_a_worker_killed_mid_ingest_loses_and_duplicates_nothing(standalone, tmp_path):
    first = tmp_path / "first"
    build_mixed_folder(first)
    # The tables exist before the run under test, so its first executor tasks are the parsing ones.
    summary_of(subprocess.run(job_command("ingest", standalone.master_url, tmp_path, f"ingest.input={first}"),
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=job_env()))
    before = {t: tables_count(tmp_path, t) for t in ("slices", "quarantine")}
    files = 240
    _copies_of_a_real_ct(tmp_path / "input", files)
    started_tasks = _running_tasks(standalone.folder)
    stderr = (tmp_path / "driver.err").open("w")
    job = subprocess.Popen(job_command("ingest", standalone.master_url, tmp_path, f"ingest.input={tmp_path / 'input'}",
                                       "ingest.max_partition_bytes=8m"),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=job_env())
    deadline = time.monotonic() + 300
    while _running_tasks(standalone.folder) == started_tasks:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before any task ran"
        time.sleep(0.2)
    victim = standalone.server("worker-2")
    cluster.kill(victim)
    stdout, _ = job.communicate(timeout=600)
    driver_log = (tmp_path / "driver.err").read_text()
    assert job.returncode == 0, driver_log[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert "Lost executor" in driver_log, "the kill did not reach the job's executors"
    assert (summary["new_files"], summary["files_ingested"], summary["slices_written"], summary["quarantined"],
            summary["accounted_for"]) == (files, files, files, {}, True)
    assert tables_count(tmp_path, "slices") == before["slices"] + files
    assert tables_count(tmp_path, "quarantine") == before["quarantine"]
    assert tables_count(tmp_path, "slices", distinct=["sop_uid", "frame"]) == before["slices"] + files
    # A re-run finds everything ingested.
    again = summary_of(subprocess.run(job_command("ingest", standalone.master_url, tmp_path,
                                                  f"ingest.input={tmp_path / 'input'}"),
                                      cwd=ROOT, capture_output=True, text=True, timeout=600, env=job_env()))
    assert (again["new_files"], again["slices_written"]) == (0, 0)


def tables_count(tmp_path: Path, table: str, distinct: list[str] | None = None) -> int:
    """Rows of a table of the test's warehouse, read with delta-rs (independently of Spark and of ctlake)."""
    from deltalake import DeltaTable

    rows = DeltaTable(str(tmp_path / "warehouse" / table)).to_pyarrow_table(columns=distinct or ["source_id"])
    if distinct:
        return rows.group_by(distinct).aggregate([]).num_rows
    return rows.num_rows


def test_the_history_server_shows_past_runs(tmp_path):
    """Event logs of a local job, served by the History Server that `make history` starts."""
    build_mixed_folder(tmp_path / "input")
    result = subprocess.run([sys.executable, "jobs/ingest.py", "--set", f"ingest.input={tmp_path / 'input'}",
                             "--set", f"warehouse={tmp_path / 'warehouse'}", "--set",
                             f"spark.event_log_dir={tmp_path / 'events'}", "--set", "spark.master=local[1]",
                             "--set", "privacy.restricted_warehouse=null"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=job_env())
    summary_of(result)
    folder = tmp_path / "servers"
    server = cluster.start_history(folder, tmp_path / "events")
    try:
        url = f"http://127.0.0.1:{server.web_ui_port}/api/v1/applications"
        deadline = time.monotonic() + 60
        while True:
            applications = json.load(urllib.request.urlopen(url, timeout=10))
            if applications or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert [a["name"] for a in applications] == ["ctlake ingest"]
        assert applications[0]["attempts"][0]["completed"] is True
    finally:
        assert [s.pid for s in cluster.stop(folder)] == [server.pid]
    assert not cluster._running(server)
