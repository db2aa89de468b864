"""User-facing errors: each carries one line that names the file or value at fault and the fix."""


class PipelineError(Exception):
    """Base class for errors caused by the user's input, configuration or environment.

    The CLI prints these as a single line and exits non-zero, without a traceback.
    """


class DataError(PipelineError):
    """A data set, metadata file or image is missing, malformed or unsafe."""


class ConfigError(PipelineError):
    """A configuration file or override is invalid."""


class BackboneError(PipelineError):
    """An unknown backbone spec, or weights that cannot be found or do not fit."""


class CacheError(PipelineError):
    """A feature cache is missing, damaged, stale, locked or lacks what was asked for."""
