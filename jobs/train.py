"""spark-submit jobs/train.py --conf conf/local.yaml [--set key=value ...]

Train and evaluate the lung-cancer classifiers on the `features` table: patient-grouped,
label-stratified train/validation/test split; a Spark MLlib random forest tuned by
patient-fold cross-validation; per-partition scikit-learn SVMs ensembled and tuned on the
validation patients; their average. Patch-, nodule- and patient-level metrics with
bootstrap intervals, a shuffled-label control, models saved under <warehouse>/models/<run_id>,
a row in the `runs` table, and the HTML report in report.folder.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import train


def main(argv=None) -> int:
    parser = job_parser("train", __doc__)
    parser.add_argument("--if-no-run", action="store_true",
                        help="train only when the warehouse has no training run yet (what `make run` does)")
    return run_job(parser, lambda spark, settings, args: train.run_and_report(spark, settings, args.if_no_run),
                   argv)


if __name__ == "__main__":
    sys.exit(main())
