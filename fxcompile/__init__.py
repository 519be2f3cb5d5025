"""fxcompile: train PyTorch models in fixed point and deploy them as integer graphs.

    import fxcompile as fxc
    qmodel = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss())
    print(fxc.inspect(qmodel))
"""
from .core.assignment import Assignment, Edge
from .core.auto import Auto, auto
from .runtime.cast import cast
from .compiler import compile
from .errors import (CheckpointError, DataError, ExportError, FormatError, FxcompileError, PolicyError, SweepError,
                     TraceError)
from .deploy.export import export_onnx
from .core.formats import FixedPoint, as_format, fixed
from .deploy.backends.hls4ml import to_hls4ml  # imports hls4ml only when called
from .reports.inspect import assignment, inspect, to_dot
from .runtime.optim import fixed_point_optimizer
from .training.batch_norms import recalibrate_batch_norms
from .core.policy import ROLES, Override, Policy, baseline, fp32, load_policy, optimized

__version__ = "0.1.0"

__all__ = ["FixedPoint", "fixed", "as_format", "cast", "Policy", "Override", "ROLES", "baseline", "optimized",
           "fp32", "load_policy", "compile", "assignment", "inspect", "to_dot", "Assignment", "Edge",
           "fixed_point_optimizer", "auto", "Auto", "FxcompileError", "FormatError", "PolicyError", "TraceError",
           "ExportError", "CheckpointError", "SweepError", "DataError", "export_onnx", "to_hls4ml", "recalibrate_batch_norms"]
