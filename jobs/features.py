"""spark-submit jobs/features.py --conf conf/local.yaml [--set key=value ...]

Compute radiomics-style features (first-order HU statistics, nodule shape, GLCM texture,
LBP histograms) and the normalized pixel baseline for every patch without them, into the
Delta table `features`. Feature names are kept in the columns' metadata.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import features as featurize


def main(argv=None) -> int:
    parser = job_parser("features", __doc__)
    return run_job(parser, lambda spark, config, args: featurize.run(spark, config), argv)


if __name__ == "__main__":
    sys.exit(main())
