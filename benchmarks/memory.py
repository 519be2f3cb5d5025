"""Memory of a fixed-point training step relative to FP32.

Two measurements per model, FP32 and the fixed-point model with every role quantized:

* **saved for backward** — bytes of the distinct tensors autograd keeps between forward and
  backward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded): the part of
  a step's memory the casts add to, measured exactly in this process;
* **peak RSS** — how far the first training steps lift the process's resident memory above
  where it was: each variant in a fresh subprocess; after imports, model construction and
  the cast-kernel load the kernel's high-water mark is reset (``/proc/self/clear_refs``,
  Linux) and ``VmHWM`` minus the resident size at that moment is read after the steps
  (gradients, optimizer state and the allocator's retained memory count, as in real use)::

    python benchmarks/memory.py
    python benchmarks/memory.py --models seed_cnn --steps 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn

import fxcompile as fxc
from fxcompile.runtime import kernels
from fxcompile.experiments.models import MLP, SeedCNN

NEAREST = dict(activation="16.8", gradient="16.10", loss="16.10", weight="24.12", bias="16.8")


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


MODELS = {"seed_cnn": (SeedCNN, (1, 28, 28), 32), "resnet18": (_resnet18, (3, 64, 64), 8), "mlp": (MLP, (1, 28, 28), 32)}


def _setup(name: str, variant: str):
    build, shape, batch = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    if variant == "fp32":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        return model, loss_fn, opt, x, y
    q = fxc.compile(model, fxc.Policy(**NEAREST), loss_fn=nn.CrossEntropyLoss())
    opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1e-3), q)
    return q, q.loss, opt, x, y


def saved_bytes(name: str, variant: str) -> int:
    model, loss_fn, _, x, y = _setup(name, variant)
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    loss.backward()
    return sum(seen.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(name: str, variant: str, steps: int) -> None:
    import gc
    model, loss_fn, opt, x, y = _setup(name, variant)
    kernels.load()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    print(json.dumps({"peak_kib": _status_kib("VmHWM") - before}))


def peak_rss_kib(name: str, variant: str, steps: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--child", name, variant, str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="seed_cnn,resnet18,mlp")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        return _child(args.child[0], args.child[1], int(args.child[2]))
    print(f"torch {torch.__version__}, cast kernels: {kernels.load()}; fixed point = every role quantized "
          "(activation 16.8, gradient 16.10, loss 16.10, weight 24.12, bias 16.8)")
    for name in args.models.split(","):
        s32, sfx = saved_bytes(name, "fp32"), saved_bytes(name, "fixed")
        r32, rfx = peak_rss_kib(name, "fp32", args.steps), peak_rss_kib(name, "fixed", args.steps)
        print(f"{name:<10} saved for backward: FP32 {s32 / 2**20:7.2f} MiB, fixed point {sfx / 2**20:7.2f} MiB, "
              f"ratio {sfx / s32:4.2f} | peak RSS above start over {args.steps} steps: FP32 {r32 / 1024:7.1f} MiB, "
              f"fixed point {rfx / 1024:7.1f} MiB, ratio {rfx / max(r32, 1):4.2f}")


if __name__ == "__main__":
    main()
