"""Errors are part of fxcompile's interface: each names the thing at fault.

Every error fxcompile raises on bad input derives from :class:`FxcompileError`, so a caller
(the command line among them) can catch them all at once; each also derives from the
built-in exception it always was, so existing ``except ValueError`` code keeps working::

    try:
        fxc.compile(model, "16.8,bogus")
    except fxc.FxcompileError as e:
        print(e)   # names the format string and the unknown option
"""

__all__ = ["FxcompileError", "FormatError", "PolicyError", "TraceError", "ExportError", "CheckpointError",
           "SweepError", "DataError"]


class FxcompileError(Exception):
    """Base of every error fxcompile raises about its input; the message says what to do."""


class FormatError(FxcompileError, ValueError):
    """A fixed-point format is invalid; the message names the field."""


class PolicyError(FxcompileError, ValueError):
    """A policy (or policy file) is invalid; the message names the key."""


class TraceError(FxcompileError, RuntimeError):
    """A model could not be captured as a graph; names the module and the operation."""


class ExportError(FxcompileError, RuntimeError):
    """A graph could not be lowered or exported; names the node(s) and op(s)."""


class CheckpointError(FxcompileError, RuntimeError):
    """A checkpoint file is unreadable (truncated, corrupted, or not a checkpoint)."""


class SweepError(FxcompileError, ValueError):
    """A sweep file or results file that cannot be used; the message names the file and key."""


class DataError(FxcompileError, FileNotFoundError):
    """The data set files are not where fxcompile was told to look."""
