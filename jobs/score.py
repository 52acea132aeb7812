"""spark-submit jobs/score.py --conf conf/local.yaml [--run-id RUN] [--series UID ...]

Score series with a saved training run: preprocess new slices, cut sliding-window patches
over the lung, compute features, apply the run's random forest and SVM ensemble, average,
aggregate to the patient, and write the Delta table `predictions` with the evidence patches.
Without --series, every ingested series of a patient the run never saw (not in its
train, validation or test split) and not yet scored by that run is scored.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import score


def main(argv=None) -> int:
    parser = job_parser("score", __doc__)
    parser.add_argument("--run-id", default=score.LATEST, metavar="RUN",
                        help="a run id from the runs table (default: %(default)s, the newest run of the warehouse)")
    parser.add_argument("--series", nargs="*", metavar="UID",
                        help="series to score (default: new patients' series not yet scored)")
    return run_job(parser, lambda spark, settings, args: score.run(spark, settings, args.run_id, args.series), argv)


if __name__ == "__main__":
    sys.exit(main())
