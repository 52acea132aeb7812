"""Jobs on a real standalone Spark cluster: a master and two one-core workers from the installed pyspark.

Executors there are separate JVMs whose Python is the packaged environment
(``make package``: a venv-pack archive Spark unpacks in each executor's work
folder), not the test's own.  This catches what local mode hides: closures
that do not pickle, jars only the driver sees, a dependency missing from the
archive, and work lost or repeated when a worker dies.
"""
import glob
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import job_runs
import pytest
from conftest import ROOT
from dicom_files import build_mixed_folder, copies_of_a_real_ct
from job_runs import job_env, summary_of

from ctlake.spark import cluster

ARCHIVE = ROOT / "dist" / "ctlake-env.tar.gz"


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
    return job_runs.job_command(job, tmp_path, f"spark.conf.spark.archives={ARCHIVE}#environment",
                                "spark.executor_python=./environment/bin/python",
                                f"spark.event_log_dir={tmp_path / 'events'}", "spark.conf.spark.executor.memory=1g",
                                *sets, master=master)


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
    copies_of_a_real_ct(tmp_path / "input", files, "kill-a-worker")
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
    rows = job_runs.table_rows(tmp_path, table, distinct or ["source_id"])
    return len(set(rows)) if distinct else len(rows)


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
