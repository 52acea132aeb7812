"""spark-submit jobs/ingest.py --conf conf/local.yaml [--input PATH ...] [--manifest FILE] [--stream] [--set key=value ...]

Ingest DICOM files into the de-identified Delta tables slices, series and quarantine.
Incremental and idempotent: files already recorded are skipped, so it is safe to run
from cron or Airflow every few minutes.  With --stream, a scheduled run queues the files
that arrived since the last one in a checkpoint and ingests them with Structured
Streaming (trigger availableNow), in micro-batches, then stops.  The last line of output
is the JSON summary.
"""
import sys

from ctlake.cli import job_parser, run_job
from ctlake.spark import ingest


def main(argv=None) -> int:
    parser = job_parser("ingest", __doc__)
    parser.add_argument("--input", action="append", metavar="PATH",
                        help="folder, glob or Hadoop URI of DICOM files; repeat it for several prefixes "
                             "(default: ingest.input)")
    parser.add_argument("--manifest", metavar="FILE",
                        help="a file naming the files to ingest, one per line (path or path,size): nothing is "
                             "listed (default: ingest.manifest)")
    parser.add_argument("--stream", dest="mode", action="store_const", const="stream", default="batch",
                        help="scheduled incremental run: queue new files in the checkpoint (ingest.checkpoint) "
                             "and ingest the queue with Structured Streaming, availableNow")
    return run_job(parser,
                   lambda spark, settings, args: ingest.run(spark, settings, args.input, args.mode, args.manifest),
                   argv, validate=lambda settings, args: ingest.validate(settings, args.input, args.manifest,
                                                                         args.mode))


if __name__ == "__main__":
    sys.exit(main())
