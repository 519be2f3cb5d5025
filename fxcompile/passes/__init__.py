"""Compiler passes, one a module; each takes a GraphModule and returns it (or data)."""
from .assign import assign_formats
from .casts import Cast, insert_casts
from .expose_params import expose_params
from .roles import annotate_roles
from .shapes import propagate_shapes
from .trace import trace

__all__ = ["trace", "expose_params", "propagate_shapes", "annotate_roles", "assign_formats", "insert_casts", "Cast"]
