"""Training-step time of fixed-point models relative to FP32, measured side by side.

Every variant of a model trains in the same process on the same batch; repeats are
interleaved (FP32, then each fixed-point variant, in a rotating order) so machine noise
hits all of them alike, and the ratio of median step times is printed.  A step is
``zero_grad``, forward, loss, backward, optimizer step (SGD; the fixed-point variants also
store the parameters back in their formats with ``fxc.fixed_point_optimizer``)::

    python benchmarks/step_time.py                      # seed CNN, resnet18, MLP; 2 threads
    python benchmarks/step_time.py --models seed_cnn --repeats 30 --threads 1
    python benchmarks/step_time.py --torch-compile      # also the inductor-compiled variants
    python benchmarks/step_time.py --no-elide           # also without identity-cast elision
    python benchmarks/step_time.py --clock cpu          # CPU seconds of the process, for a shared machine
    python benchmarks/step_time.py --retain-memory      # glibc keeps freed memory (see below)
    python benchmarks/step_time.py --device cuda        # resnet18 b128, resnet50 and vit_b_16 b64, 224x224

With ``--device cuda`` the models train on the GPU (the casts run the Triton kernels of
``fxcompile.runtime.kernels.gpu``), each timed step ends with ``torch.cuda.synchronize()``,
and the default models are the ImageNet-sized ``CUDA_MODELS``; without a CUDA GPU the
option is refused with a message.

glibc's malloc trims its heap when much of its top is free and faults the memory back in,
page by page, when the next step allocates again; where a step's buffers sit decides how
often that happens.  The cast kernels take their outputs from their own cache of freed
blocks (``fxcompile.runtime.kernels.cache_info()``), outside malloc's heap, so the fixed-point step
leaves malloc the same allocations as the FP32 step.  ``--retain-memory`` sets
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with ``mallopt`` for the whole process, every
variant alike (the effect of running with jemalloc or tcmalloc), which removes the page
faults from both sides.

Variants: ``nearest`` (every role quantized with the baseline formats, round to nearest),
``stochastic`` (the shipped baseline policy: gradients, weights and biases rounded
stochastically), ``all_stochastic`` (every role stochastic) and, when ``qtorch`` imports,
``qpytorch`` (QPyTorch's ``Quantizer`` after every layer with the same formats and its
low-precision optimizer wrapper for the weights).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.runtime import kernels
from fxcompile.experiments.models import MLP, SeedCNN

BASELINE = dict(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8")


def _stochastic(formats, roles):
    return {r: (f"{f},stochastic" if r in roles else f) for r, f in formats.items()}


POLICIES = {
    "nearest": lambda: fxc.Policy(name="nearest", **BASELINE),
    "stochastic": lambda: fxc.Policy(name="stochastic", **_stochastic(BASELINE, {"gradient", "weight", "bias"})),
    "all_stochastic": lambda: fxc.Policy(name="all_stochastic", **_stochastic(BASELINE, set(BASELINE))),
}


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def _torchvision(name):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(num_classes=10)
    return build


MODELS = {  # name -> (builder, input shape without batch, batch size)
    "seed_cnn": (SeedCNN, (1, 28, 28), 32),
    "resnet18": (_resnet18, (3, 64, 64), 8),
    "mlp": (MLP, (1, 28, 28), 32),
}
CUDA_MODELS = {  # the sizes GPUs train at
    "resnet18": (_torchvision("resnet18"), (3, 224, 224), 128),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224), 64),
    "vit_b_16": (_torchvision("vit_b_16"), (3, 224, 224), 64),
}


def _fp32_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def _fixed_step(model, policy, x, y, compile_mode=False, elide=True):
    qmodel = fxc.compile(model, policy, loss_fn=nn.CrossEntropyLoss(), elide_casts=elide)
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(qmodel.parameters(), lr=1e-3), qmodel)
    forward = torch.compile(qmodel) if compile_mode else qmodel

    def step():
        opt.zero_grad(set_to_none=True)
        qmodel.loss(forward(x), y).backward()
        opt.step()
    return step


def _qpytorch_step(model, x, y):
    """QPyTorch: a Quantizer after every leaf layer (forward 16.8, backward 16.10), weights in 24.12."""
    from qtorch import FixedPoint
    from qtorch.optim import OptimLP
    from qtorch.quant import Quantizer, quantizer

    def wrap(module):
        for name, child in module.named_children():
            if len(list(child.children())) == 0:
                q = Quantizer(forward_number=FixedPoint(16, 8), backward_number=FixedPoint(16, 10),
                              forward_rounding="nearest", backward_rounding="nearest")
                setattr(module, name, nn.Sequential(child, q))
            else:
                wrap(child)
        return module
    model = wrap(model)
    loss_fn = nn.CrossEntropyLoss()
    weight_quant = quantizer(forward_number=FixedPoint(24, 12), forward_rounding="nearest")
    opt = OptimLP(torch.optim.SGD(model.parameters(), lr=1e-3), weight_quant=weight_quant)

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def _variants(name, args):
    build, shape, batch = args.models_table[name]
    batch = args.batch or batch
    torch.manual_seed(0)
    base = build().to(args.device)
    x = torch.randn(batch, *shape).to(args.device)
    y = torch.randint(0, 10, (batch,)).to(args.device)
    steps = {"fp32": _fp32_step(copy.deepcopy(base), x, y)}
    for policy in args.policies:
        steps[policy] = _fixed_step(copy.deepcopy(base), POLICIES[policy](), x, y)
        if args.no_elide:
            steps[policy + "-no-elide"] = _fixed_step(copy.deepcopy(base), POLICIES[policy](), x, y, elide=False)
    if args.torch_compile:
        steps["fp32+compile"] = _fp32_step(torch.compile(copy.deepcopy(base)), x, y)
        steps["nearest+compile"] = _fixed_step(copy.deepcopy(base), POLICIES["nearest"](), x, y, True)
    try:
        steps["qpytorch"] = _qpytorch_step(copy.deepcopy(base), x, y)
    except ImportError:
        pass
    except Exception as exc:  # noqa: BLE001 - qtorch builds its own extension; report, do not fail
        warnings.warn(f"qpytorch variant skipped: {exc}")
    return steps


def retain_memory() -> None:
    """Make glibc keep freed memory in the heap instead of returning it to the kernel."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt failed")


def measure(steps: dict, repeats: int, inner: int, warmup: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per step of each entry, repeats interleaved in a rotating order.

    ``clock`` is wall time by default; ``time.process_time`` (CPU seconds of this process,
    all its threads) is steadier on a machine other jobs share, where wall time also counts
    the time this process waits for a core."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            for _ in range(inner):
                steps[k]()
            times[k].append((clock() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def _cuda_clock() -> float:
    torch.cuda.synchronize()  # the step's kernels have run, not just been queued
    return time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=None,
                   help="comma-separated (default: seed_cnn,resnet18,mlp; with --device cuda: resnet18,resnet50,vit_b_16)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: each model's own)")
    p.add_argument("--policies", default="nearest,stochastic,all_stochastic")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=5, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or CPU time of the process (steadier on a shared machine)")
    p.add_argument("--retain-memory", action="store_true",
                   help="glibc keeps freed memory for reuse (mallopt), for every variant alike")
    p.add_argument("--torch-compile", action="store_true", help="add torch.compile (inductor) variants")
    p.add_argument("--no-elide", action="store_true",
                   help="add variants compiled with elide_casts=False (compile() elides identity casts by default)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False, "
                f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a machine with a GPU, "
                "or leave out --device to time the CPU kernels")
    args.models_table = CUDA_MODELS if args.device == "cuda" else MODELS
    args.models = args.models or ",".join(args.models_table)
    unknown = [m for m in args.models.split(",") if m not in args.models_table]
    if unknown:
        p.error(f"--models: unknown {unknown} for --device {args.device}; choose from {sorted(args.models_table)}")
    kernels.load()  # a first build (about a minute) must not land inside a timed region
    args.policies = args.policies.split(",")
    torch.set_num_threads(args.threads)
    if args.retain_memory:
        retain_memory()
    where = (f"GPU {torch.cuda.get_device_name()}, cast kernels: triton" if args.device == "cuda"
             else f"{torch.get_num_threads()} threads, cast kernels: {kernels.load()}")
    kernels.load()
    print(f"torch {torch.__version__}, {where}, "
          f"{args.repeats} interleaved repeats x {args.inner} steps, {args.clock} clock"
          + (", freed memory retained (mallopt)" if args.retain_memory else ""))
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.device == "cuda":
        if args.clock == "cpu":
            p.error("--clock cpu measures host CPU time, not GPU time: use the default wall clock with --device cuda")
        clock = _cuda_clock
    for name in args.models.split(","):
        medians = measure(_variants(name, args), args.repeats, args.inner, args.warmup, clock)
        fp32 = medians["fp32"]
        _, shape, batch = args.models_table[name]
        print(f"\n{name} (batch {args.batch or batch}, input {shape}, {args.device})")
        for k, t in medians.items():
            base = medians["fp32+compile"] if k == "nearest+compile" else fp32
            print(f"  {k:<16}{1e3 * t:9.2f} ms/step   ratio {t / base:5.2f}")


if __name__ == "__main__":
    main()
