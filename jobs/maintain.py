"""spark-submit jobs/maintain.py --conf conf/local.yaml [--set maintenance.retain_hours=H]

VACUUM every ctlake table: delete the data files no table version of the last
maintenance.retain_hours reads (files a killed or losing writer left behind, files of
versions a MERGE superseded). Schedule it daily; ingest_runs rows are never removed, and
time travel to the versions they name works for retain_hours.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import maintenance


def main(argv=None) -> int:
    parser = job_parser("maintain", __doc__)
    return run_job(parser, lambda spark, settings, args: maintenance.run(spark, settings), argv)


if __name__ == "__main__":
    sys.exit(main())
