"""Compiler passes that choose formats and rewrite a captured graph for fixed-point
training, one a module; each takes a GraphModule and returns it (or data)."""
from .assign import assign_formats
from .casts import Cast, insert_casts

__all__ = ["assign_formats", "insert_casts", "Cast"]
