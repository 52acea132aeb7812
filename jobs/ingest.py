"""spark-submit jobs/ingest.py --conf conf/local.yaml [--input PATH] [--set key=value ...]

Ingest DICOM files into the de-identified Delta tables slices, series and quarantine.
Incremental and idempotent: files already recorded are skipped, so it is safe to run
from cron or Airflow every few minutes.  The last line of output is the JSON summary.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import ingest


def main(argv=None) -> int:
    parser = job_parser("ingest", __doc__)
    parser.add_argument("--input", metavar="PATH",
                        help="folder, glob or Hadoop URI of DICOM files (default: ingest.input)")
    return run_job(parser,
                   lambda spark, settings, args: ingest.run(spark, settings, args.input),
                   argv, validate=lambda settings, args: ingest.validate(settings, args.input))


if __name__ == "__main__":
    sys.exit(main())
