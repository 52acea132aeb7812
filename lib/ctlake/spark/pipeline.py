"""Several stages in one Spark session: what ``make run`` and a cluster submission of the whole chain use.

Each job pays a JVM start, Delta's jar loading and its first log replays
(about 8-12 s on 2 cores, docs/speed.md); a chain of seven jobs paid that
seven times and, on a cluster, seven executor launches and seven unpackings
of the environment archive.  The stages here are the jobs' own functions
called in order on one session, so a chain gives the same tables as the jobs
run one by one (tests/test_cluster.py compares them).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

from pyspark.sql import SparkSession

from ctlake.config import Settings
from ctlake.errors import ConfigError
from ctlake.spark import cohort, detect, features, ingest, patches, preprocess, score, train

log = logging.getLogger(__name__)


class Options(NamedTuple):
    """What the chain's stages take beyond the settings (the single jobs' command-line options)."""

    inputs: tuple[str, ...] = ()
    cohort_output: str | None = None
    if_no_run: bool = False
    run_id: str = score.LATEST


#: Every stage in the order the chain runs them; a chain is any subsequence.
STAGES: dict[str, Callable[[SparkSession, Settings, Options], dict]] = {
    "cohort": lambda spark, settings, o: cohort.run(spark, settings, o.cohort_output),
    "ingest": lambda spark, settings, o: ingest.run(spark, settings, list(o.inputs) or None),
    "preprocess": lambda spark, settings, o: preprocess.run(spark, settings),
    "detect": lambda spark, settings, o: detect.run(spark, settings),
    "patches": lambda spark, settings, o: patches.run(spark, settings),
    "features": lambda spark, settings, o: features.run(spark, settings),
    "train": lambda spark, settings, o: train.run_and_report(spark, settings, o.if_no_run),
    "score": lambda spark, settings, o: score.run(spark, settings, o.run_id),
}


#: What ``jobs/pipeline.py`` runs without ``--stages``: the sample pipeline up to the trained models.
DEFAULT = "ingest,preprocess,detect,patches,features,train"


def parse_stages(text: str) -> list[str]:
    """``"ingest,preprocess"`` as stage names in the chain's order; unknown or repeated names are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise ConfigError(f"--stages takes names from {', '.join(STAGES)}; found {text!r}")
    if len(set(names)) != len(names) or names != sorted(names, key=list(STAGES).index):
        raise ConfigError(f"--stages must name each stage once, in the order {', '.join(STAGES)}; found {text!r}")
    return names


def validate(settings: Settings, stages: list[str], inputs: tuple[str, ...]) -> None:
    """What the chain's first stages would refuse, refused before Spark starts."""
    if "ingest" in stages and "cohort" not in stages:  # a cohort made in the chain marks its own input
        ingest.validate(settings, list(inputs) or None)


def run(spark: SparkSession, settings: Settings, stages: list[str], options: Options) -> dict:
    """Run ``stages`` in order; the summary holds each stage's summary and seconds.

    A stage that raises ends the chain: the later stages would read tables the
    failed one did not finish (the failed run's summary names its cause).
    """
    summary = {"stages": {}}
    for name in stages:
        started = time.monotonic()
        log.info("stage %s", name)
        try:
            result = STAGES[name](spark, settings, options)
        except BaseException:
            log.error("stage %s failed after %.1f s; stages done: %s", name, time.monotonic() - started,
                      ", ".join(summary["stages"]) or "none")
            raise
        summary["stages"][name] = {"seconds": round(time.monotonic() - started, 1), **result}
    return summary
