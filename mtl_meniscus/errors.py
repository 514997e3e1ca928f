"""Domain errors: the CLI turns these into a clear message and exit code 1, never a traceback."""


class MeniscusError(Exception):
    """Base class of every error a user can fix (bad config, bad data, missing weights)."""


class ConfigError(MeniscusError):
    """A config file or option has an unknown key or a bad value."""


class DataError(MeniscusError):
    """labels.csv or the data folder is invalid; the message lists every bad row."""


class ImageReadError(MeniscusError):
    """One image file cannot be read as a single 2D grey slice."""
