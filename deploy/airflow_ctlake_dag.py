"""Example Airflow DAGs for ctlake: streaming ingest every 5 minutes, then preprocess; VACUUM daily.

Copy into Airflow's dags folder and set the Airflow Variables ``ctlake_home`` (the checkout with
``make package`` done), ``ctlake_master`` (the Spark master URL) and ``ctlake_conf``; put the
pseudonymization key in the worker's environment as ``CTLAKE_PSEUDONYM_KEY`` (a Kubernetes or
Vault secret), never in a Variable.  Each task's last line of standard output is the job's JSON
summary, which BashOperator pushes to XCom: downstream tasks and alerts read the counts from there.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import PythonOperator


def submit(job: str, args: str = "") -> str:
    """``make submit`` of one job (with its options ``args``) with the packaged environment on the cluster."""
    return ("cd {{ var.value.ctlake_home }} && make submit JOB=%s ARGS='%s' MASTER={{ var.value.ctlake_master }} "
            "CONF={{ var.value.ctlake_conf }}" % (job, args))


def check_ingest(ti) -> None:
    """Fail the DAG run loudly when an ingest lost track of files (the summary says so; nothing is lost)."""
    summary = json.loads(ti.xcom_pull(task_ids="ingest"))
    if summary.get("unaccounted"):
        raise ValueError(f"{summary['unaccounted']} files changed while ingest {summary['run_id']} read them; "
                         "the next run reads them again")


with DAG("ctlake_ingest", schedule=timedelta(minutes=5), start_date=datetime(2026, 1, 1), catchup=False,
         max_active_runs=1, default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
         tags=["ctlake"]) as ingest_dag:
    # --stream: each run ingests what arrived since the last one (checkpointed), then stops.
    ingest = BashOperator(task_id="ingest", bash_command=submit("ingest", "--stream"))
    check = PythonOperator(task_id="check_ingest", python_callable=check_ingest)
    preprocess = BashOperator(task_id="preprocess", bash_command=submit("preprocess"))
    ingest >> [check, preprocess]

with DAG("ctlake_maintain", schedule="17 3 * * *", start_date=datetime(2026, 1, 1), catchup=False,
         max_active_runs=1, tags=["ctlake"]) as maintain_dag:
    BashOperator(task_id="vacuum", bash_command=submit("maintain"))
