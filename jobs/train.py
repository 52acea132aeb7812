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
    return run_job(parser, lambda spark, config, args: train.run_and_report(spark, config), argv,
                   validate=lambda config, args: train.validate(config))


if __name__ == "__main__":
    sys.exit(main())
