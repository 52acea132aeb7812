"""spark-submit jobs/pipeline.py --conf conf/local.yaml [--stages ingest,preprocess,...] [--set key=value ...]

Run several stages in one Spark session, in this order: cohort, ingest, preprocess, detect,
patches, features, train, score (any subsequence of them). Each stage is the job of the same
name; one session saves each later stage the JVM start and, on a cluster, the executor launch
and the unpacking of the environment archive. The summary holds every stage's summary; the
first stage that fails ends the chain. `make run` uses it.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import pipeline, score


def main(argv=None) -> int:
    parser = job_parser("pipeline", __doc__)
    parser.add_argument("--stages", default=pipeline.DEFAULT, metavar="A,B,...",
                        help=f"stages to run, in the order {', '.join(pipeline.STAGES)} (default: {pipeline.DEFAULT})")
    parser.add_argument("--input", action="append", metavar="PATH",
                        help="ingest: folder, glob or Hadoop URI (repeatable; default: ingest.input)")
    parser.add_argument("--cohort-output", metavar="PATH", help="cohort: output folder (default: cohort.output)")
    parser.add_argument("--if-no-run", action="store_true",
                        help="train: only when the warehouse has no training run yet (what `make run` does)")
    parser.add_argument("--run-id", default=score.LATEST, metavar="RUN",
                        help="score: the run to score with (default: %(default)s, the newest)")
    return run_job(parser,
                   lambda spark, settings, args: pipeline.run(spark, settings, pipeline.parse_stages(args.stages),
                                                              pipeline.Options(tuple(args.input or ()),
                                                                               args.cohort_output, args.if_no_run,
                                                                               args.run_id)),
                   argv, validate=lambda settings, args: pipeline.validate(settings, pipeline.parse_stages(args.stages),
                                                                           tuple(args.input or ())))


if __name__ == "__main__":
    sys.exit(main())
