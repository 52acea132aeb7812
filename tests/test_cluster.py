"""Jobs on a real standalone Spark cluster: a master and two one-core workers from the installed pyspark.

Executors there are separate JVMs whose Python is the packaged environment
(``make package``: a venv-pack archive Spark unpacks in each executor's work
folder), not the test's own.  This catches what local mode hides: closures
that do not pickle, jars only the driver sees, a dependency missing from the
archive, and work lost or repeated when a worker dies.
"""
import glob
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import job_runs
import pytest
from conftest import ROOT
from dicom_files import build_mixed_folder, copies_of_a_real_ct
from job_runs import cluster_command as job_command
from job_runs import job_env, summary_of

from ctlake.spark import cluster


@pytest.fixture(scope="module")
def first_ingest(standalone, tmp_path_factory):
    """The mixed folder ingested on the cluster into a new warehouse: what the later tests start from."""
    tmp = tmp_path_factory.mktemp("on-cluster")
    expected = build_mixed_folder(tmp / "first")
    result = _run_on(standalone, job_command("ingest", standalone.master_url, tmp, f"ingest.input={tmp / 'first'}"))
    return tmp, expected, result


def _run_on(state, command: list[str]) -> subprocess.CompletedProcess:
    """``job_runs.run`` of a cluster job; if it hangs, fail with what the driver, master, workers and executors logged.

    A hang on the cluster leaves nothing behind once the test's folders are gone, so its evidence
    (an executor that cannot start, a full disk, a worker lost) goes into the failure itself. The
    job takes about 45 s here; five minutes is a hang, not a slow machine.
    """
    try:
        return job_runs.run(command, timeout=300)
    except subprocess.TimeoutExpired as hung:
        driver = hung.stderr.decode(errors="replace") if isinstance(hung.stderr, bytes) else hung.stderr or ""
        logs = [Path(s.log) for s in cluster.ClusterState.load(state.folder).servers]
        logs += sorted(Path(state.folder).glob("work-*/app-*/*/stderr"))
        tails = "\n".join(f"--- {log} (last 1500 characters)\n{log.read_text(errors='replace')[-1500:]}"
                          for log in logs if log.is_file())
        free = shutil.disk_usage(state.folder).free / 2**30
        pytest.fail(f"{command[1]} hung on the cluster for {hung.timeout} s; {free:.1f} GiB free under"
                    f" {state.folder}\n--- driver (last 3000 characters)\n{driver[-3000:]}\n{tails}", pytrace=False)


def test_ingest_runs_on_the_cluster_from_the_packaged_environment(standalone, first_ingest):
    _, expected, result = first_ingest
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


def _running_tasks(folder: str) -> dict[str, int]:
    """Tasks each worker's executors have started so far, from their logs in the worker's work folder."""
    return {work: sum(Path(log).read_text(errors="replace").count("Running task")
                      for log in glob.glob(f"{folder}/{work}/app-*/*/stderr"))
            for work in sorted(p.name for p in Path(folder).glob("work-*"))}


def _kill_a_busy_worker(state, job: subprocess.Popen, started: dict[str, int]) -> str:
    """Wait until an executor of ``job`` runs a task, then SIGKILL that executor's worker; its role."""
    deadline = time.monotonic() + 300
    while True:
        busy = [work for work, count in _running_tasks(state.folder).items() if count > started.get(work, 0)]
        if busy:
            break
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before any task ran"
        time.sleep(0.2)
    victim = "worker-" + busy[0].split("-")[1]
    cluster.kill(cluster.ClusterState.load(state.folder).server(victim))
    return victim


def _submit_and_kill(state, command: list[str], stderr: Path) -> tuple[dict, str]:
    """Run ``command`` on the cluster, kill the worker of its first task; the summary and the driver's log."""
    started = _running_tasks(state.folder)
    with stderr.open("w") as err:
        job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=job_env())
        victim = _kill_a_busy_worker(state, job, started)
        stdout, _ = job.communicate(timeout=600)
    driver_log = stderr.read_text()
    assert job.returncode == 0, driver_log[-3000:]
    assert "Lost executor" in driver_log, f"the kill of {victim} did not reach the job's executors"
    return json.loads(stdout.strip().splitlines()[-1]), victim


def test_a_worker_killed_mid_ingest_and_mid_preprocess_loses_and_duplicates_nothing(standalone, first_ingest,
                                                                                   installed_env):
    tmp, _, result = first_ingest
    summary_of(result)
    before = {t: tables_count(tmp, t) for t in ("slices", "quarantine")}
    files = 240
    copies_of_a_real_ct(tmp / "input", files, "kill-a-worker")
    summary, _ = _submit_and_kill(standalone, job_command("ingest", standalone.master_url, tmp,
                                                          f"ingest.input={tmp / 'input'}", "ingest.max_partition_bytes=8m",
                                                          events="events-later", python=installed_env), tmp / "ingest.err")
    assert (summary["new_files"], summary["files_ingested"], summary["slices_written"], summary["quarantined"],
            summary["accounted_for"]) == (files, files, files, {}, True)
    slices = before["slices"] + files
    assert tables_count(tmp, "slices") == tables_count(tmp, "slices", distinct=["sop_uid", "frame"]) == slices
    assert tables_count(tmp, "quarantine") == before["quarantine"]
    # A re-run (in local mode: the tables alone decide) finds everything ingested.
    again = summary_of(job_runs.run(job_runs.job_command("ingest", tmp, f"ingest.input={tmp / 'input'}")))
    assert (again["new_files"], again["slices_written"]) == (0, 0)

    # Two workers again, then preprocessing of every slice loses one of them.
    cluster.add_worker(standalone.folder)
    summary, _ = _submit_and_kill(standalone, job_command("preprocess", standalone.master_url, tmp,
                                                          "preprocess.arrow_max_bytes_per_batch=2m",
                                                          events="events-later", python=installed_env), tmp / "preprocess.err")
    assert summary["slices_processed"] == slices
    key = ["sop_uid", "frame"]
    assert sorted(job_runs.table_rows(tmp, "preprocessed", key)) == sorted(job_runs.table_rows(tmp, "slices", key))
    assert tables_count(tmp, "preprocessed", distinct=key) == slices


def tables_count(tmp_path: Path, table: str, distinct: list[str] | None = None) -> int:
    rows = job_runs.table_rows(tmp_path, table, distinct or ["source_id"])
    return len(set(rows)) if distinct else len(rows)


def test_the_history_server_shows_past_runs(first_ingest):
    """The event logs of the cluster's first ingest, served by the History Server that `make history` starts."""
    tmp = first_ingest[0]
    folder = tmp / "servers"
    server = cluster.start_history(folder, tmp / "events")
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



def test_a_server_is_waited_for_while_its_process_lives_whatever_its_command_line_reads(tmp_path):
    """Right after a launch /proc/<pid>/cmdline can read empty: that is no reason to call the server dead."""
    log = tmp_path / "server.log"
    log.write_text("")
    process = subprocess.Popen(["bash", "-c", f"sleep 1; echo 'I have been elected leader' >> {log}; exec sleep 600"],
                               start_new_session=True)
    server = cluster.Server("master", "a class its command line does not name", process.pid, str(log), 0)
    try:
        cluster.wait_for_log(server, "elected leader", seconds=30)
        process.kill()
        process.wait()
        with pytest.raises(cluster.ClusterError, match=r"did not log 'never said' in 0 s, and its process ended"):
            cluster.wait_for_log(server, "never said", seconds=30)
    finally:
        process.kill()
