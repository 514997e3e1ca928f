"""Domain errors: the CLI turns these into a clear message and exit code 1, never a traceback."""


class MeniscusError(Exception):
    """Base class of every error a user can fix (bad config, bad data, missing weights)."""


class ConfigError(MeniscusError):
    """A config file or option has an unknown key or a bad value."""


class ConfigValueError(ConfigError):
    """A config key with a bad value (config.check_value, an unknown registered name); `key` lets
    the loader name the file or option that wrote the value (config.Origins)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class DataError(MeniscusError):
    """labels.csv or the data folder is invalid; the message lists every bad row.

    `problems` holds every problem found, one line each (the message may show only the first ones).
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class ImageReadError(MeniscusError):
    """One image file cannot be read as a single 2D grey slice."""


class SliceIndexError(ImageReadError):
    """A slice index that does not fit its file: out of range, on a single 2D slice, or missing
    for a volume. In labels.csv that is the row's error (its `slice` column), not the file's."""


class PixelLimitError(ImageReadError):
    """An input declares more pixels than the decoded-size limit; refused before it is decoded."""
