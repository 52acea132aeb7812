"""Jobs run as a user runs them: ``jobs/<name>.py`` in its own process, its tables read back with delta-rs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ARCHIVE, ROOT

KEY = "c" * 32


def job_command(job: str, tmp_path: Path, *sets: str, master: str = "local[1]") -> list[str]:
    """The command of ``job`` over the test's warehouse (``tmp_path / 'warehouse'``), with ``--set`` overrides."""
    command = [sys.executable, f"jobs/{job}.py", "--set", f"spark.master={master}",
               "--set", f"warehouse={tmp_path / 'warehouse'}", "--set", "spark.event_log_dir=null",
               "--set", "ingest.progress_seconds=1", "--set", f"report.folder={tmp_path / 'report'}",
               "--set", f"privacy.restricted_warehouse={tmp_path / 'restricted'}"]
    for item in sets:
        command += ["--set", item]
    return command


def cluster_command(job: str, master: str, tmp_path: Path, *sets: str, events: str = "events",
                    python: Path | None = None) -> list[str]:
    """``make submit``'s command: the job's driver here, its executors on the cluster with the archive's Python.

    With ``python``, the executors run that interpreter instead of unpacking the archive: the
    deployment where every node has the environment installed, and what spares each later test
    the archive's shipping and unpacking (about 20 s per application on 2 cores).
    """
    environment = ([f"spark.executor_python={python}"] if python else
                   [f"spark.conf.spark.archives={ARCHIVE}#environment", "spark.executor_python=./environment/bin/python"])
    return job_command(job, tmp_path, *environment, f"spark.event_log_dir={tmp_path / events}",
                       "spark.conf.spark.executor.memory=1g", *sets, master=master)


def job_env(**extra: str) -> dict:
    """The job's environment: the pseudonymization key, servers on 127.0.0.1, and ``extra``."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "CTLAKE_PSEUDONYM_KEY": KEY, **extra}
    env.pop("PYSPARK_PYTHON", None)
    return env


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or job_env())


def run(command: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or job_env())


def summary_of(result) -> dict:
    """The JSON summary on the last line of a job's standard output (it must have succeeded)."""
    if isinstance(result, subprocess.Popen):
        stdout, stderr = result.communicate(timeout=600)
        result = subprocess.CompletedProcess(result.args, result.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def table_rows(tmp_path: Path, table: str, columns: list[str], warehouse: str = "warehouse") -> list[tuple]:
    """Rows of ``columns`` of a table, read with delta-rs (independently of Spark and of ctlake); [] if none."""
    from deltalake import DeltaTable

    folder = tmp_path / warehouse / table
    if not (folder / "_delta_log").is_dir():
        return []
    rows = DeltaTable(str(folder)).to_pyarrow_table(columns=columns)
    return list(zip(*(rows.column(c).to_pylist() for c in columns)))
