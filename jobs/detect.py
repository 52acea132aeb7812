"""spark-submit jobs/detect.py --conf conf/local.yaml [--set key=value ...]

Find nodule candidates in every preprocessed series not yet detected with the configured
detector parameters (section `detect`), into the Delta tables `candidates` (one row per
candidate: centre in patient mm and voxels, size, score, nearest slice) and `detections`
(one row per series: how many candidates, how long, or why none). Run jobs/preprocess.py first.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import detect


def main(argv=None) -> int:
    parser = job_parser("detect", __doc__)
    return run_job(parser, lambda spark, settings, args: detect.run(spark, settings), argv)


if __name__ == "__main__":
    sys.exit(main())
