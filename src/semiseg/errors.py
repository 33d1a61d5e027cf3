"""Errors that reach the user as one clear line instead of a traceback.

Every error raised on bad input derives from :class:`SemisegError`; the command line prints
its message (which names the file or key and the problem) and exits with status 2.
"""

from __future__ import annotations


class SemisegError(Exception):
    """Base class of all user-facing errors."""


class ConfigError(SemisegError, ValueError):
    """A configuration key is unknown, mistyped or has an invalid value."""


class DataError(SemisegError, ValueError):
    """A data file is unreadable, malformed or inconsistent with its partner."""


class SplitError(DataError):
    """A split names a missing case or leaves a required subset empty."""


class CheckpointError(SemisegError, ValueError):
    """A checkpoint cannot be read or does not match the model it is loaded into."""


class MissingDependencyError(SemisegError, ImportError):
    """An optional dependency is not installed; the message says how to get it."""


class NumericsError(SemisegError, ArithmeticError):
    """Training arithmetic went wrong: a non-finite loss, or reduced precision that does not
    reproduce fp32 on this device (the self-check of :mod:`semiseg.engine.precision`)."""
