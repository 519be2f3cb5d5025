"""Deploy: a trained fixed-point model as an integer graph, and as an ONNX file.

``integer_graph`` chains the deploy passes (fold batch norm, lower to integer ops);
``export_onnx`` writes that graph as ONNX that ONNX Runtime runs bit-exactly, or, with
``flavour="qdq"`` or ``"qonnx"``, the BN-folded float model with QuantizeLinear/DequantizeLinear
pairs (:mod:`fxcompile.deploy.backends.qdq`) or QONNX ``Quant`` nodes (:mod:`fxcompile.deploy.backends.qonnx`)
at every fixed-point edge::

    qmodel = fxc.compile(model, fxc.baseline(), loss_fn=nn.CrossEntropyLoss())
    ...train...
    fxc.export_onnx(qmodel, "model.onnx", example_inputs=(x[:1],))
    fxc.export_onnx(qmodel, "model_qdq.onnx", example_inputs=(x[:1],), flavour="qdq")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import onnx
import torch
import torch.fx as fx

from .backends.onnx import to_onnx
from .backends.qdq import to_qdq
from .backends.qonnx import to_qonnx
from ..core import ir
from ..core.files import atomic_write
from ..errors import ExportError
from .fold_bn import fold_bn
from .lower import IntegerGraph, lower

__all__ = ["integer_graph", "export_onnx", "onnx_session", "verify", "input_error", "FLAVOURS"]

FLAVOURS = ("integer", "qdq", "qonnx")


def integer_graph(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> IntegerGraph:
    """The integer program of ``qmodel`` (batch norms folded; see :mod:`fxcompile.deploy.lower`)."""
    if not isinstance(qmodel, fx.GraphModule):
        raise ExportError(f"expected a model compiled with fxc.compile, got {type(qmodel).__name__}")
    _check_inputs(qmodel, example_inputs)
    return lower(fold_bn(qmodel), tuple(example_inputs))


class _FirstRejection(fx.Interpreter):
    """Runs the graph and, on the first node that raises, says which node that was."""

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except Exception as e:  # noqa: BLE001 - any op may reject an input its own way
            raise _Rejected(n, e) from e


class _Rejected(Exception):
    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


def input_error(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> ExportError | None:
    """The :class:`ExportError` naming the example input, its shape and the first op that rejects it
    (``None`` if ``qmodel`` runs on ``example_inputs``)."""
    placeholders = [n for n in qmodel.graph.nodes if n.op == "placeholder"]
    names = ", ".join(repr(n.name) for n in placeholders)
    if len(example_inputs) != len(placeholders):
        return ExportError(f"the model takes {len(placeholders)} input(s) ({names}), "
                           f"got {len(example_inputs)} example input(s)")
    shapes = ", ".join(f"{n.name!r} of shape {tuple(x.shape)}" for n, x in zip(placeholders, example_inputs))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            _FirstRejection(qmodel).run(*example_inputs)
    except _Rejected as r:
        node = r.node
        op = ir.OP.get(node) or (node.target if isinstance(node.target, str) else
                                          getattr(node.target, "__name__", str(node.target)))
        compiled = [n.meta["tensor_meta"].shape for n in placeholders if "tensor_meta" in n.meta]
        hint = (f"; the model was compiled for {', '.join(str(tuple(s)) for s in compiled)}"
                if len(compiled) == len(placeholders) else "")
        message = str(r.error).strip().splitlines()[0] if str(r.error).strip() else type(r.error).__name__
        return ExportError(f"example input {shapes} is rejected by node {node.name!r} ({op}): {message}{hint}")
    finally:
        qmodel.train(was_training)
    return None


def _check_inputs(qmodel: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    # one eval forward before lowering: the shape propagation inside would otherwise fail
    # deep in torch with a traceback that names no input
    error = input_error(qmodel, tuple(example_inputs))
    if error is not None:
        raise error


def export_onnx(qmodel: fx.GraphModule, path: str | os.PathLike, example_inputs: Sequence[torch.Tensor],
                flavour: str = "integer", **options) -> onnx.ModelProto:
    """Write ``qmodel``'s integer graph to ``path`` as ONNX and return the model.

    Float input → quantizer → int64 ops only → dequantizer → float output ``output`` (plus its
    int64 codes ``output_codes``); the batch dimension is free.  ``flavour="qdq"`` writes the
    QDQ model and ``"qonnx"`` the QONNX model instead (float output ``output``; not bit-exact:
    see their modules).  ``options`` go to the flavour's exporter (``to_qdq``'s
    ``uint8_activations=True``, ``bias_scale``; ``to_onnx``'s ``eight_bit``).  The model passes ``onnx.checker.check_model(full_check=True)``.
    The file is written to a temporary name and renamed, so a failed export leaves nothing at
    ``path``, and the file gets the permissions the umask gives (``0644`` under the usual
    ``022``); raises :class:`ExportError` naming every node that does not lower (or, for the
    other flavours, every edge whose format the flavour cannot write), and, for example inputs
    the model cannot run on, the input, its shape and the first op that rejects it.
    """
    path = Path(path)
    if flavour not in FLAVOURS:
        raise ExportError(f"unknown export flavour {flavour!r}; flavours are {', '.join(FLAVOURS)}")
    if flavour == "integer":
        model = to_onnx(integer_graph(qmodel, example_inputs), name=type(qmodel).__name__, **options)
    else:
        if not isinstance(qmodel, fx.GraphModule):
            raise ExportError(f"expected a model compiled with fxc.compile, got {type(qmodel).__name__}")
        to_flavour = to_qdq if flavour == "qdq" else to_qonnx
        _check_inputs(qmodel, example_inputs)
        model = to_flavour(fold_bn(qmodel), tuple(example_inputs), name=type(qmodel).__name__, **options)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported graph is not valid ONNX: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(model.SerializeToString())  # what onnx.save writes
    return model


def onnx_session(model: onnx.ModelProto | str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported model (a ModelProto or a file)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def verify(qmodel: fx.GraphModule, model: onnx.ModelProto | str | os.PathLike, x: torch.Tensor,
           y: torch.Tensor | None = None, batch_size: int = 500) -> dict:
    """Run the exported ``model`` (ONNX Runtime), the integer reference and ``qmodel`` (the
    float fixed-point simulation, eval mode) on ``x`` and compare them.  ``x`` is a tensor, or a
    tuple of the model's inputs in order (token ids and an attention mask: int64 as they are).

    Returns ``mismatches`` (output codes where ORT differs from the integer reference),
    ``simulation_mismatches`` (output codes where the simulation differs from the integer
    reference), ``outputs`` (number of output codes), ``top1_agreement`` (fraction of rows whose argmax
    agrees between the integer graph and the simulation), ``max_code_difference`` (largest
    |integer − simulation| in output codes), and with labels ``y`` the accuracy of each.
    """
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)  # several inputs: token ids, an attention mask
    x = xs[0]
    graph = integer_graph(qmodel, tuple(t[:1] for t in xs))
    out_op = graph.op_of(graph.outputs[0])
    session = onnx_session(model)
    input_names = [i.name for i in session.get_inputs()]
    from .backends.integer import run_integer
    was_training = qmodel.training
    qmodel.eval()
    stats = {"mismatches": 0, "simulation_mismatches": 0, "outputs": 0, "agree": 0, "max_code_difference": 0, "correct": [0, 0, 0],
             "rows": 0}
    try:
        for i in range(0, len(x), batch_size):
            xbs = [t[i:i + batch_size] for t in xs]
            _, ort_codes = session.run(None, {n: t.numpy() for n, t in zip(input_names, xbs)})
            (ref_codes,) = run_integer(graph, *xbs, codes=True)
            with torch.no_grad():
                sim = qmodel(*xbs)
            sim_codes = torch.round(sim.double() * 2.0 ** out_op.frac).to(torch.int64)
            ort_codes = torch.from_numpy(ort_codes)
            stats["mismatches"] += int((ort_codes != ref_codes).sum())
            stats["simulation_mismatches"] += int((sim_codes != ref_codes).sum())
            stats["outputs"] += ref_codes.numel()
            stats["agree"] += int((ref_codes.argmax(-1) == sim.argmax(-1)).sum())  # per row (per token for an LM)
            stats["rows"] += ref_codes.numel() // max(ref_codes.shape[-1], 1)
            stats["max_code_difference"] = max(stats["max_code_difference"], int((ref_codes - sim_codes).abs().max()))
            if y is not None:
                yb = y[i:i + batch_size]
                for k, pred in enumerate((ort_codes, ref_codes, sim)):
                    stats["correct"][k] += int((pred.argmax(1) == yb).sum())
    finally:
        qmodel.train(was_training)
    result = {"images": len(x), "mismatches": stats["mismatches"],
              "simulation_mismatches": stats["simulation_mismatches"], "outputs": stats["outputs"],
              "top1_agreement": stats["agree"] / max(stats["rows"], 1), "max_code_difference": stats["max_code_difference"]}
    if y is not None:
        for k, name in enumerate(("ort_accuracy", "integer_accuracy", "simulation_accuracy")):
            result[name] = stats["correct"][k] / len(x)
    return result
