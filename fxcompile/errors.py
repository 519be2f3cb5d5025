"""Errors are part of fxcompile's interface: each names the thing at fault."""

__all__ = ["FormatError", "PolicyError", "TraceError", "ExportError"]


class FormatError(ValueError):
    """A fixed-point format is invalid; the message names the field."""


class PolicyError(ValueError):
    """A policy (or policy file) is invalid; the message names the key."""


class TraceError(RuntimeError):
    """A model could not be captured as a graph; names the module and the operation."""


class ExportError(RuntimeError):
    """A graph could not be lowered or exported; names the node(s) and op(s)."""
