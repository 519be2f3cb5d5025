"""Capture: a model becomes an annotated ``torch.fx`` graph (trace, functionalize, expose
parameters, shapes, roles)."""
from .expose_params import expose_params
from .functionalize import functionalize
from .roles import annotate_roles
from .shapes import propagate_shapes
from .trace import trace

__all__ = ["trace", "functionalize", "expose_params", "propagate_shapes", "annotate_roles"]
