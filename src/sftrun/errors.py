"""User-facing errors.

Owns the one exception family the CLI turns into a one-line message and a non-zero exit.
Every message says what is wrong, where (file:line, key or path) and the fix. Code that
raises one of these must never also print a traceback.
"""

from __future__ import annotations


class SftrunError(Exception):
    """An error a user can meet and fix; ``str(err)`` is the whole message."""

    exit_code = 1


class ConfigError(SftrunError):
    """The configuration file or a command-line override is invalid."""

    exit_code = 2


class DataError(SftrunError):
    """A data file is missing or one of its records is malformed."""

    exit_code = 3


class CheckpointError(SftrunError):
    """A checkpoint is missing, incomplete, damaged or incompatible."""

    exit_code = 4


class ModelError(SftrunError):
    """The base model folder is missing or cannot be loaded."""

    exit_code = 5


class DiskSpaceError(SftrunError):
    """Not enough free disk space to write checkpoints safely."""

    exit_code = 6


class FolderInUseError(SftrunError):
    """Another process holds the output folder's lock."""

    exit_code = 8


class DivergenceError(SftrunError):
    """Training produced NaN or infinity; the run stopped without committing it."""

    exit_code = 7
