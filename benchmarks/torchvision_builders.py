"""Which torchvision classification models compile under fxcompile and train one step.

Every builder of ``torchvision.models.list_models(module=torchvision.models)`` is built with
random weights, run eagerly in training mode on a 2x3x64x64 batch (224x224 or 299x299 when
the model needs more), compiled
with the baseline policy (fx front-end) and trained for one SGD step with the loss graph.
Models above ``--max-params`` are skipped (listed as such).  Each model runs in its own
subprocess with one torch thread, so a crash or a hang costs only that model::

    python benchmarks/torchvision_builders.py                      # all builders, a table
    python benchmarks/torchvision_builders.py --json builders.json # also the records as JSON
    python benchmarks/torchvision_builders.py --one resnet18       # one model, one JSON line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = (64, 224, 299)
MAX_PARAMS = 200_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _logits(out):
    # GoogLeNet / Inception return a namedtuple (logits, aux...) in training mode
    if isinstance(out, tuple):
        return getattr(out, "logits", out[0])
    return out


def check(name: str, max_params: int = MAX_PARAMS) -> dict:
    """Build, compile and train ``name`` one step; a record of what happened (never raises)."""
    import torch
    import torchvision

    import fxcompile as fxc

    torch.manual_seed(0)
    rec: dict = {"model": name, "status": "ok", "size": None, "params": None, "error": None}
    t0 = time.perf_counter()
    try:
        model = torchvision.models.get_model(name, weights=None)
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="build_failed", error=_first_line(exc))
    rec["params"] = sum(p.numel() for p in model.parameters())
    if rec["params"] > max_params:
        return dict(rec, status="skipped_too_large")
    model.train()  # the size a model needs in training (Inception's auxiliary head needs more)
    for size in SIZES:
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
            rec["size"] = size
            break
        except Exception as exc:  # noqa: BLE001
            rec["error"] = _first_line(exc)
    if rec["size"] is None:
        return dict(rec, status="eager_failed")
    rec["error"] = None
    y = torch.tensor([1, 2])
    try:
        q = fxc.compile(model, fxc.baseline(), loss_fn=torch.nn.CrossEntropyLoss(), example_inputs=(x,))
    except fxc.TraceError as exc:
        return dict(rec, status="trace_error", error=str(exc), seconds=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="compile_failed", error=_first_line(exc), seconds=time.perf_counter() - t0)
    rec["casts"] = len(list(q.casts.children()))
    try:
        opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1e-3), q)
        loss = q.loss(_logits(q(x)), y)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            rec.update(status="nonfinite_loss", error=f"loss {loss.item()}")
    except Exception as exc:  # noqa: BLE001
        rec.update(status="train_failed", error=_first_line(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def run_all(names=None, timeout: float = 600, max_params: int = MAX_PARAMS, log=print) -> list[dict]:
    """Check every builder, one subprocess each."""
    import torchvision
    names = names or torchvision.models.list_models(module=torchvision.models)
    records = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--max-params", str(max_params)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            rec = json.loads(lines[-1]) if lines else {
                "model": name, "status": "crashed", "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "status": "timeout", "error": f"more than {timeout:.0f} s"}
        records.append(rec)
        log(f"{name:<28} {rec['status']:<18} {rec.get('size') or '':>4} {rec.get('seconds', '')!s:>7}"
            f"  {(rec.get('error') or '')[:200]}")
    return records


def summary(records: list[dict]) -> str:
    ok = [r["model"] for r in records if r["status"] == "ok"]
    skipped = [f"{r['model']} ({r['params'] / 1e6:.0f}M params)" for r in records
               if r["status"] == "skipped_too_large"]
    failed = [r for r in records if r["status"] not in ("ok", "skipped_too_large")]
    lines = [f"{len(ok)} of {len(records)} builders compile and train one step "
             f"({len(skipped)} skipped as too large, {len(failed)} failed)",
             f"ok: {', '.join(ok)}", f"skipped: {', '.join(skipped) or '-'}", "failures:"]
    lines += [f"  {r['model']} [{r['status']}]: {r.get('error')}" for r in failed]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help="check one model in this process and print its record as JSON")
    p.add_argument("--models", nargs="+", help="check only these builders")
    p.add_argument("--max-params", type=int, default=MAX_PARAMS)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write the records to this file")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(check(args.one, args.max_params)))
        return
    records = run_all(args.models, args.timeout, args.max_params)
    print()
    print(summary(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
