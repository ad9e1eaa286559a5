"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class ResnetlabError(Exception):
    """A problem the user can fix (bad input, config, path); never shown with a traceback."""


class ConfigError(ResnetlabError):
    """An unknown configuration key or an invalid value; the message names the key."""


class DataError(ResnetlabError):
    """Missing, corrupt or inconsistent data."""


class CheckpointError(ResnetlabError):
    """A missing, truncated, corrupt, unsafe or mismatched checkpoint."""


class DivergenceError(ResnetlabError):
    """Training produced a NaN or infinite loss."""
