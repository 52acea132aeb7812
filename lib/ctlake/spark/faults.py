"""Kill points: named places in a job where a fault test kills the driver, as a lost machine would.

Why in the code: a driver killed "somewhere during ingestion" by a timer from
outside lands at a different step on every machine, so a test of the step
between the ``slices`` commit and the ``series`` update would pass or fail by
luck.  With ``CTLAKE_KILL_AT=<point>`` the process sends itself SIGKILL when
it reaches that point (``<point>:<seconds>``: that many seconds later, for a
point that starts a long Spark job, so the kill lands while it runs).  No
handler runs, nothing is flushed: the same as ``kill -9`` or a machine lost.
Unset (always, outside the fault tests) a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import threading

#: The environment variable that names the point to die at.
KILL_AT = "CTLAKE_KILL_AT"


def point(name: str) -> None:
    """Die here (or after the given delay) if ``CTLAKE_KILL_AT`` names this point."""
    wanted, _, delay = os.environ.get(KILL_AT, "").partition(":")
    if wanted != name:
        return
    if delay:
        threading.Timer(float(delay), _die).start()
    else:
        _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
