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


class OutputError(SemisegError, OSError):
    """An output cannot be written: a full disk, a read-only folder, a file where a folder
    belongs (or the reverse). The message names the path and the operating system's reason."""


class RunInterruptedError(SemisegError):
    """A run stopped on SIGINT / SIGTERM after saving what it could: ``what`` happened, the
    command that continues it (``resume``), and ``exit_code``, the shell's convention for the
    signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, what: str, exit_code: int, resume: str) -> None:
        super().__init__(f"{what}; continue with: {resume}")
        self.what = what
        self.exit_code = exit_code
        self.resume = resume
