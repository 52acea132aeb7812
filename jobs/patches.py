"""spark-submit jobs/patches.py --conf conf/local.yaml [--mode candidates|window] [--series UID ...]

Cut fixed-size patches (patches.size_mm resampled to patches.out_px, 2D or 2.5D) into the
Delta table `patches`, with lineage to patient, series, slice and candidate:
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
    return run_job(parser, lambda spark, config, args: patches.run(spark, config, args.mode, args.series),
                   argv, validate=lambda config, args: patches.params_from_config(config))


if __name__ == "__main__":
    sys.exit(main())
