"""spark-submit jobs/score.py --conf conf/local.yaml [--run-id RUN] [--series UID ...]

Score series with a saved training run: preprocess new slices, detect nodule candidates,
cut their patches, compute features, apply the run's two stages (P(nodule) x P(malignant);
random forest, SVM ensemble and their ensemble), aggregate to the patient, and write the
Delta table `predictions` with the evidence candidates. --mode window scores sliding
windows over the lung instead of the detector's candidates. --labels measures the run's
predictions for the series of a labels.csv against it.
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
    parser.add_argument("--mode", choices=("detected", "window"), default="detected",
                        help="patches to score: the detector's candidates (default) or sliding windows")
    parser.add_argument("--labels", metavar="CSV",
                        help="a labels.csv (seriesuid,label,...): also measure the run's predictions for those series "
                             "against it, at the run's threshold (a cohort the run never saw)")
    return run_job(parser, lambda spark, settings, args: score.run(spark, settings, args.run_id, args.series,
                                                                   args.mode, args.labels), argv)


if __name__ == "__main__":
    sys.exit(main())
