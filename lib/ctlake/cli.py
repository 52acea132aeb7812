"""What every job's ``main()`` shares: arguments, settings, session, summary, exit code.

Exit codes: 0 the run succeeded (bad input files do not fail a run, they are
quarantined); 1 the run itself failed; 2 the arguments or the configuration
are wrong, reported as one line on standard error.  The last line of
standard output is always the run summary as one JSON object, which is what
schedulers such as Airflow read.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from typing import Callable

from ctlake.config import Settings, load_settings
from ctlake.errors import ConcurrentWriteError, ConfigError, InputError, error_cause

log = logging.getLogger("ctlake")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def job_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The argument parser every job starts from: ``--conf``, repeatable ``--set``, ``--sets`` and ``--check``."""
    parser = _OneLineParser(prog=name, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf", default="conf/local.yaml", metavar="YAML",
                        help="configuration file (default: %(default)s; it extends conf/base.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one configuration key, e.g. --set cohort.patients=8 (repeatable; "
                             "values are YAML: --set 'train.svm.c=[0.3, 1.0]')")
    parser.add_argument("--sets", default="", metavar="'KEY=VALUE ...'",
                        help="several overrides in one shell-quoted string (what `make ... SET=\"...\"` passes)")
    parser.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("CTLAKE_LOG_FORMAT", "text"),
                        help="log lines on standard error as text or as JSON objects, one per line "
                             "(default: $CTLAKE_LOG_FORMAT, else text)")
    parser.add_argument("--check", action="store_true",
                        help="validate the arguments and the configuration, print the settings, and exit "
                             "without starting Spark")
    return parser


class JsonLines(logging.Formatter):
    """One JSON object per log record, for log shippers (Fluent Bit, Loki, CloudWatch) that parse fields."""

    def __init__(self, job: str):
        super().__init__()
        self.job = job

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "job": self.job, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(job: str = "ctlake", log_format: str = "text") -> None:
    """Log lines on standard error only: standard output carries the summary and nothing else."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(job) if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("py4j").setLevel(logging.WARNING)


def format_summary(job: str, summary: dict) -> str:
    """A short human reading of a summary dict: one ``key: value`` line each, nested indented."""
    lines = [f"{job} summary"]

    def walk(mapping: dict, depth: int) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                lines.append(f"{'  ' * depth}{key}:" + ("" if value else " none"))
                walk(value, depth + 1)
            else:
                lines.append(f"{'  ' * depth}{key}: {value}")

    walk(summary, 1)
    return "\n".join(lines)


def overrides(args: argparse.Namespace) -> list[str]:
    try:
        return shlex.split(args.sets) + list(args.overrides)
    except ValueError as exc:
        raise ConfigError(f"--sets is not a shell-quoted list of KEY=VALUE: {exc}") from exc


def run_job(parser: argparse.ArgumentParser, run: Callable, argv: list[str] | None = None,
            validate: Callable | None = None) -> int:
    """Parse, configure, build the session, call ``run(spark, settings, args)``, report.

    The configuration is parsed once, here, into :class:`~ctlake.config.Settings`;
    ``validate(settings, args)`` runs before any Spark work so mistakes cost
    nothing; it raises ConfigError or InputError.
    """
    args = parser.parse_args(argv)
    job = parser.prog
    setup_logging(job, args.log_format)
    try:
        settings = load_settings(args.conf, overrides(args))
        if validate is not None:
            validate(settings, args)
    except (ConfigError, InputError) as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        print(json.dumps({"job": job, "status": "valid", "conf": args.conf, "settings": settings.redacted()},
                         default=str))
        return EXIT_OK
    return _run_with_session(job, run, settings, args)


def _run_with_session(job: str, run: Callable, settings: Settings, args: argparse.Namespace) -> int:
    from ctlake.spark.session import build_session  # pyspark import only once the arguments are sound

    started = time.monotonic()
    try:
        spark = build_session(settings.spark, job)
    except ConfigError as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = run(spark, settings, args)
        status, code = "succeeded", EXIT_OK
    except (ConfigError, InputError) as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        summary, status, code = {"error": str(exc)}, "failed", EXIT_USAGE
    except ConcurrentWriteError as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        summary, status, code = {"error": str(exc)}, "failed", EXIT_FAILED
    except Exception as exc:  # the run itself failed: keep the traceback for the operator
        log.exception("%s failed", job)
        summary, status, code = {"error": error_cause(exc)}, "failed", EXIT_FAILED
    finally:
        spark.stop()
    summary = {"job": job, "status": status, "seconds": round(time.monotonic() - started, 1), **summary}
    print(format_summary(job, summary))
    print(json.dumps(summary, sort_keys=False, default=str))
    sys.stdout.flush()
    return code
