"""spark-submit jobs/patches.py --conf conf/local.yaml [--mode detected|window] [--series UID ...]

Cut patches into the Delta table `patches`, with lineage to patient, series, slice and
candidate: volumes of patches.size_mm x size_mm x depth_mm resampled to isotropic voxels
(patches.out_px across; with depth_mm 0, 2D or 2.5D stacks of patches.neighbours slices):
  detected    every candidate of the detect job (of the given series, or all), plus, when no
              series is given, every annotated nodule of patches.annotations (LUNA16 csv,
              patient mm): what training and scoring both read;
  window      a sliding window over the lung mask of every slice of the given series.
Slices already cut with the same parameters are skipped.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import patches


def main(argv=None) -> int:
    parser = job_parser("patches", __doc__)
    parser.add_argument("--mode", choices=patches.MODES, default="detected",
                        help="detected (default: the detector's candidates and the annotated nodules) or window")
    parser.add_argument("--series", nargs="*", metavar="UID",
                        help="series to cut (default: every detected, or every preprocessed, series)")
    return run_job(parser, lambda spark, settings, args: patches.run(spark, settings, args.mode, args.series), argv)


if __name__ == "__main__":
    sys.exit(main())
