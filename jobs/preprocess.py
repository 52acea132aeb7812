"""spark-submit jobs/preprocess.py --conf conf/local.yaml [--set key=value ...]

Run the configured OpenCV chain (preprocess.steps: HU window, equalization, denoising,
adaptive threshold, lung mask) over every slice not yet processed with that chain, into
the Delta table `preprocessed`, and write a montage PNG of one slice through every stage.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import preprocess


def main(argv=None) -> int:
    parser = job_parser("preprocess", __doc__)
    return run_job(parser, lambda spark, settings, args: preprocess.run(spark, settings), argv)


if __name__ == "__main__":
    sys.exit(main())
