"""Named exceptions raised at the edges of ctlake (arguments, configuration, inputs).

Errors inside the data path are values (a ``status`` column, the quarantine
table); exceptions are for the edges, where the run cannot sensibly go on.
"""


class CtlakeError(Exception):
    """Base class of every error ctlake raises on purpose."""


class ConfigError(CtlakeError):
    """The configuration or the command line asks for something invalid."""


class InputError(CtlakeError):
    """An input the job needs (a path, a table, a database) is missing or unusable."""


class ConcurrentWriteError(CtlakeError):
    """Other writers kept committing to a table first; the run wrote nothing there and can be run again."""


def error_cause(exc: BaseException) -> str:
    """The one line of a failure that names its cause, for a run's summary and its ``ingest_runs`` row.

    A Python traceback carried in the message (a Python worker's error, seen
    through Py4J) ends with the cause; a JVM error (Delta's
    ``[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: ...``) starts with
    it and ends with a link to documentation.
    """
    text = f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        return lines[-1]
    return lines[0]
