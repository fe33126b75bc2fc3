"""Errors a user can cause. The CLI prints them in one line and exits with code 2."""


class VitlabError(Exception):
    """Base class of every error caused by user input (bad flags, files, data, checkpoints)."""


class ConfigError(VitlabError):
    """An invalid model, recipe or command-line configuration."""


class CheckpointError(VitlabError):
    """A missing, foreign, corrupted or incompatible checkpoint or weight file."""


class DataError(VitlabError):
    """A dataset that cannot be found, read or trusted."""
