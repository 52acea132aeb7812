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
