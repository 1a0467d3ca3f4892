"""The errors the CLI turns into a one-line message: here, without torch, so that the CLI can name them before it
imports anything heavy."""


class ConfigError(ValueError):
    """An unknown key or an invalid value in a config or on the command line (exit code 2)."""


class UsageError(Exception):
    """A command's arguments do not make sense (exit code 2)."""


class WeightsMissingError(RuntimeError):
    """A loss is switched on but its pretrained weights are not here; the message says what to fetch and where
    (exit code 2)."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the message says why (exit code 1)."""


class DataError(ConfigError):
    """Data that cannot be trained on: an unreadable or foreign shard index, a set too small for one batch, shards
    prepared with another encoder, an epoch of bad samples; the message says what to change (exit code 2)."""
