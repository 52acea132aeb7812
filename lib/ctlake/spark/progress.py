"""Progress lines for long jobs, read from Spark's status tracker (no console progress bar)."""
from __future__ import annotations

import logging
import threading

from pyspark import SparkContext

log = logging.getLogger("ctlake.progress")


class StageProgress:
    """Log ``label: done/total tasks`` every ``seconds`` while the ``with`` block runs.

    Spark's console bar is disabled for batch jobs because it writes carriage
    returns into logs; this gives an operator the same information as log lines.
    """

    def __init__(self, sc: SparkContext, label: str, seconds: float = 10.0):
        self.sc, self.label, self.seconds = sc, label, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.seconds > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        tracker = self.sc.statusTracker()
        while not self._stop.wait(self.seconds):
            stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
            stages = [s for s in stages if s is not None]
            if stages:
                done = sum(s.numCompletedTasks for s in stages)
                total = sum(s.numTasks for s in stages)
                log.info("%s: %d/%d tasks done in %d active stage(s)", self.label, done, total, len(stages))
