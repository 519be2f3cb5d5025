"""Data-parallel training whose gradient all-reduce is fixed-point integer arithmetic.

:func:`fixed_point_allreduce_hook` is a DDP communication hook: each rank rounds its
gradient bucket to the parameters' gradient formats (``weight_gradient`` / ``bias_gradient``
of the policy), all-reduces the integer *codes* (an exact integer sum, in int32 when
``bits - 1 + ceil(log2(world_size)) <= 30`` and int64 otherwise, so the sum never
overflows), and converts the summed codes back.

The result is the **sum** over ranks, ``sum(codes) * 2**-frac``: exact, on the format's grid
(with ``ceil(log2(world_size))`` more integer bits, as a hardware adder tree has), with no
division to round.  Why the sum and not DDP's usual mean: in fixed point the per-sample
gradient that reaches the loss-gradient format is ``dloss/dlogit / batch``, so a rank that
divides by its *local* batch rounds finer than single-process training does, and N ranks
would not follow one process.  :func:`train_ddp` therefore scales each rank's mean loss by
``local batch / global batch``: every rank then rounds exactly the per-sample gradients a
single process with the global batch rounds, and the sum over ranks is that process's
gradient, bit for bit, when two conditions hold (the tests check it with such a policy):
each rank's partial sum of a weight gradient is exact on the weight-gradient grid (a format
fine enough for the products, else each rank rounds its share and the sum may differ from the
single process's by a code), and no rank's loss value saturates its loss format (a saturated
loss cast passes no gradient, and each rank's loss is the mean over its own share).  With
stochastic rounding the draws also differ with the split.  ``FixedPointAllReduce(average=True)`` divides by the world size instead (DDP's
convention, for an unscaled loss); the mean is rounded once to the gradient's dtype.

Run it on one machine or several with torchrun (gloo on CPU, nccl on GPUs)::

    torchrun --nproc-per-node 2 -m fxcompile.training.distributed --dataset synthetic --policy baseline \\
        --epochs 2 --batch-size 64

or from Python, inside an initialised process group::

    ddp = DistributedDataParallel(qmodel)
    ddp.register_comm_hook(FixedPointAllReduce.from_model(qmodel), fixed_point_allreduce_hook)
"""

# no `from __future__ import annotations`: DDP checks the hook's GradBucket annotation at runtime
import argparse
import dataclasses
import gc
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.fx as fx

from ..core import ir
from ..core.formats import FixedPoint, as_format

__all__ = ["FixedPointAllReduce", "fixed_point_allreduce_hook", "gradient_formats", "train_ddp", "main"]


def gradient_formats(qmodel: fx.GraphModule) -> dict[torch.nn.Parameter, FixedPoint]:
    """The backward (gradient) format of every parameter edge of a compiled model."""
    out = {}
    for _, gm in ir.graphs(qmodel):
        for node in gm.graph.nodes:
            value = ir.VALUE.get(node)
            if node.op == "get_attr" and value is not None and value.backward is not None:
                out[gm.get_parameter(node.target)] = value.backward
    return out


@dataclasses.dataclass
class FixedPointAllReduce:
    """State of the hook: a gradient format per parameter (``default`` for the others)."""

    formats: dict = dataclasses.field(default_factory=dict)   # Parameter -> FixedPoint
    default: FixedPoint | None = None
    group: dist.ProcessGroup | None = None
    average: bool = False

    def __post_init__(self):
        self.default = as_format(self.default, where="FixedPointAllReduce.default")

    @classmethod
    def from_model(cls, qmodel: fx.GraphModule, default=None, group=None, average=False) -> "FixedPointAllReduce":
        return cls({id(p): f for p, f in gradient_formats(qmodel).items()}, as_format(default), group, average)

    def format_for(self, p: torch.nn.Parameter) -> FixedPoint:
        fmt = self.formats.get(id(p), self.default)
        if fmt is None:
            raise ValueError(f"no gradient format for a parameter of shape {tuple(p.shape)}: compile the model "
                             "with a policy that quantizes its gradient, or give FixedPointAllReduce(default=...)")
        return fmt


def _codes(g: torch.Tensor, fmt: FixedPoint) -> tuple[torch.Tensor, int]:
    finite = torch.isfinite(g)
    bad = int(g.numel() - finite.sum())
    return fmt.to_codes(torch.where(finite, g, 0.0).flatten()), bad


def fixed_point_allreduce_hook(state: FixedPointAllReduce, bucket: dist.GradBucket,
                               ) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a gradient bucket as integer codes; the future holds the summed (or mean) gradient.

    A bucket in which any rank has a NaN or infinite gradient comes back all NaN, so a
    diverging run stays visible instead of turning into numbers.
    """
    group = state.group if state.group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    grads, params = bucket.gradients(), bucket.parameters()
    formats = [state.format_for(p) for p in params]
    parts, bad = [], 0
    for g, fmt in zip(grads, formats):
        codes, b = _codes(g, fmt)
        parts.append(codes)
        bad += b
    wide = max(f.bits for f in formats) - 1 + math.ceil(math.log2(max(world, 1)))
    dtype = torch.int32 if wide <= 30 else torch.int64
    flat = torch.cat(parts + [parts[0].new_tensor([bad])]).to(dtype)  # on the gradients' device (NCCL: CUDA)
    fut = dist.all_reduce(flat, group=group, async_op=True).get_future()

    def decode(fut: torch.futures.Future) -> torch.Tensor:
        total = fut.value()[0]
        buffer = bucket.buffer()
        if int(total[-1]) > 0:
            return buffer.fill_(math.nan)
        offset = 0
        for g, fmt in zip(grads, formats):
            n = g.numel()
            s = total[offset:offset + n].to(torch.float64) - world * fmt.zero_point
            g.copy_((s * (fmt.scale / world if state.average else fmt.scale)).view_as(g))
            offset += n
        return buffer   # the gradients are views of the bucket's buffer

    return fut.then(decode)


# ---- training -------------------------------------------------------------------------------

def train_ddp(cfg, train_data, test_data, fixed_point_comm: bool = True) -> dict:
    """:func:`fxcompile.training.train.train` on every rank of the current process group.

    ``cfg.batch_size`` is the *global* batch: each step takes the same global batch as
    single-process training and every rank trains on its contiguous share of it.  With
    ``fixed_point_comm`` each rank's loss is scaled by its share of the global batch and the
    hook sums (see the module docstring); otherwise DDP averages float gradients.  Metrics
    (test accuracy after each epoch) are the same on every rank.
    """
    from torch.nn.parallel import DistributedDataParallel
    from .train import _build, evaluate
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    (tx, ty), (vx, vy) = train_data, test_data
    model, loss_fn, opt = _build(cfg, tx[:2])
    ddp = DistributedDataParallel(model)
    summed = fixed_point_comm and isinstance(model, fx.GraphModule)
    if summed:
        ddp.register_comm_hook(FixedPointAllReduce.from_model(model), fixed_point_allreduce_hook)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = (len(tx) + cfg.batch_size - 1) // cfg.batch_size
    history, losses, times = [], [], []
    for epoch in range(cfg.epochs):
        ddp.train()
        perm = torch.randperm(len(tx), generator=g)
        for i in range(steps):
            batch = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            idx = batch.tensor_split(world)[rank]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(tx[idx]), ty[idx])
            (loss * (len(idx) / len(batch)) if summed else loss).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "accuracy": evaluate(model, vx, vy),
                        "train_loss": statistics.fmean(losses[-steps:])})
    return {"policy": cfg.policy_name(), "world_size": world, "rank": rank, "seed": cfg.seed,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "accuracy": history[-1]["accuracy"],
            "history": history, "step_time_ms": 1e3 * statistics.median(times), "model_object": model}


def close_process_group(synchronize: bool = True) -> None:
    """Destroy the default process group so that the process exits cleanly.

    Collects garbage first: a DDP reducer or finished gloo work still holding tensors when the
    interpreter shuts down makes the process abort ("terminate called without an active
    exception", SIGABRT) after all its work is done. ``synchronize`` waits for every rank
    first; pass ``False`` on an error path, where a peer may never arrive.
    """
    gc.collect()
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    """torchrun entry point: ``torchrun --nproc-per-node 2 -m fxcompile.training.distributed ...``."""
    from ..experiments.sweep import build_model, load_dataset
    from .train import TrainConfig
    p = argparse.ArgumentParser(prog="python -m fxcompile.training.distributed", description=main.__doc__)
    p.add_argument("--dataset", default="synthetic", choices=["fashion_mnist", "digits", "synthetic"])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--model", default="seed_cnn")
    p.add_argument("--policy", default="baseline", help="fp32, baseline, optimized, 8bit or a policy file")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-scale", type=float, default=1,
                   help="power of two multiplying the loss's gradient (fixed-point policies; default 1)")
    p.add_argument("--float-comm", action="store_true", help="all-reduce in floating point (DDP's default)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ok = False
    try:
        train_data, test_data = load_dataset(args.dataset, args.train_subset, 0, args.data)
        torch.manual_seed(args.seed)
        cfg = TrainConfig(model=build_model(args.model), policy=None if args.policy == "fp32" else args.policy,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          progress=False, loss_scale=args.loss_scale)
        m = train_ddp(cfg, train_data, test_data, fixed_point_comm=not args.float_comm)
        if dist.get_rank() == 0:
            per_epoch = ", ".join(f"{100 * h['accuracy']:.2f}" for h in m["history"])
            print(f"{args.policy} on {m['world_size']} ranks, global batch {args.batch_size}: test accuracy "
                  f"{100 * m['accuracy']:.2f}% (per epoch: {per_epoch})", flush=True)
        del m
        ok = True
    finally:
        close_process_group(synchronize=ok)


if __name__ == "__main__":
    main()
