"""Ingestion on a real standalone Spark cluster (master + worker from the installed pyspark).

Executors there are separate JVMs with their own Python workers, so this
catches what local mode hides: closures that do not pickle, jars that only
the driver sees, a Python on the executors without ctlake's dependencies.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest
from conftest import ROOT
from dicom_files import build_mixed_folder

SPARK_HOME = Path(pyspark.__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(path: Path, text: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {path}:\n{path.read_text(errors='replace')[-2000:] if path.exists() else ''}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master and one 2-core worker bound to 127.0.0.1, stopped by pid."""
    work = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_NO_DAEMONIZE": "1", "PYSPARK_PYTHON": sys.executable}
    port = free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    master_log, worker_log = work / "master.log", work / "worker.log"
    master = subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(free_port())],
                              env=env, stdout=master_log.open("w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_for(master_log, "I have been elected leader")
        worker = subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                                   "--host", "127.0.0.1", "--cores", "2", "--memory", "2g",
                                   "--webui-port", str(free_port()), "--work-dir", str(work / "worker")],
                                  env=env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT)
        wait_for(worker_log, "Successfully registered with master")
        yield f"spark://127.0.0.1:{port}"
    finally:
        for process in (worker, master):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_ingest_job_on_a_standalone_cluster(cluster, tmp_path):
    expected = build_mixed_folder(tmp_path / "input")
    command = [sys.executable, "jobs/ingest.py", "--input", str(tmp_path / "input"),
               "--set", f"spark.master={cluster}", "--set", f"warehouse={tmp_path / 'warehouse'}",
               "--set", f"spark.executor_python={sys.executable}",
               "--set", "spark.conf.spark.executor.memory=1g", "--set", "ingest.progress_seconds=0",
               "--set", f"privacy.restricted_warehouse={tmp_path / 'restricted'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "CTLAKE_PSEUDONYM_KEY": "c" * 32})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded"
    assert summary["files_seen"] == len(expected) and summary["accounted_for"]
    assert summary["slices_written"] == 6
    assert summary["quarantined"]["duplicate"] == 2
