"""spark-submit jobs/patches.py --conf conf/local.yaml [--mode candidates|window] [--series UID ...]

Cut patches into the Delta table `patches`, with lineage to patient, series, slice and
candidate: volumes of patches.size_mm x size_mm x depth_mm resampled to isotropic voxels
(patches.out_px across; with depth_mm 0, 2D or 2.5D stacks of patches.neighbours slices):
  candidates  every row of patches.candidates (LUNA16 csv, patient mm) plus seeded random
              negatives inside the lung masks, away from annotated nodules (training);
  window      a sliding window over the lung mask of every slice of the given series (scoring).
Slices already cut with the same parameters are skipped.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import patches


def main(argv=None) -> int:
    parser = job_parser("patches", __doc__)
    parser.add_argument("--mode", choices=patches.MODES, default="candidates",
                        help="candidates (training, default) or window (scoring)")
    parser.add_argument("--series", nargs="*", metavar="UID",
                        help="window mode: series to cover (default: every preprocessed series)")
    return run_job(parser, lambda spark, settings, args: patches.run(spark, settings, args.mode, args.series), argv)


if __name__ == "__main__":
    sys.exit(main())
