"""spark-submit jobs/features.py --conf conf/local.yaml [--set key=value ...]

Compute the features of every patch without them, into the Delta table `features`:
on the centre slice, first-order HU statistics of the segmented nodule, 2D shape, GLCM
texture and LBP histograms; over the whole volume patch, the nodule segmented in 3D
(volume, sphericity, elongation, margin, HU mix, ...); and the normalized pixel baseline.
Feature names are kept in the columns' metadata; a new layout rewrites the table.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import features


def main(argv=None) -> int:
    parser = job_parser("features", __doc__)
    return run_job(parser, lambda spark, settings, args: features.run(spark, settings), argv)


if __name__ == "__main__":
    sys.exit(main())
