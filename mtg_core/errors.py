"""The project's errors. Each message names the thing that is wrong and how to fix it, in one line."""


class MtgError(Exception):
    """Base class: the CLI prints the message alone and exits with `exit_code`."""

    exit_code = 2
    label = "error"


class PluginError(MtgError):
    """An expert plugin failed to load, broke the hook contract, or clashes with another plugin."""


class UnknownExpertError(MtgError):
    """No installed plugin registers the requested expert."""


class DataError(MtgError):
    """A training or held-out data file is missing or malformed."""


class ConfigError(MtgError):
    """An option, a config file or a setting from a plugin is out of range."""


class BaseModelError(MtgError):
    """The base model cannot be found, loaded, or quantised as asked."""


class OutOfMemory(MtgError):
    """The run does not fit the device's memory."""

    exit_code = 3


class TrainingInterrupted(MtgError):
    """SIGINT or SIGTERM stopped training after a checkpoint; the exit status is 128 + the signal."""

    label = "interrupted"

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
