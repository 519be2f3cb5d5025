"""Which CNNs of torchvision and timm deploy as integer graphs, bit-exactly?

Every torchvision CNN classifier (the transformer-style ones, ``vit_*``, ``swin_*`` and
``maxvit_t``, are left to the attention ops) and a sample of at least 50 timm CNNs, one
per timm family that has a CNN, then seconds from the largest families (listed in the
output).  A CNN here is a model with a 2-d convolution and no attention, recurrent or
token-mixing module.  Each model is built with random weights and 10 classes, compiled under
``baseline``, trained one SGD step at batch 2 (so batch-norm statistics are not their
defaults), then in eval mode exported in the integer, QDQ and QONNX flavours and run on
``--inputs`` random inputs (64 by default) of the smallest size it takes among 64, 96, 128
and 224.  A record per model says, per flavour, whether it exported (else the
``ExportError``'s text) and the size of its ONNX file, and for the integer flavour the output
codes where ONNX Runtime differs from the integer reference, where the fixed-point simulation
differs from it, and the top-1 agreement of simulation and integer graph.  Records go to ``--out`` one JSON line each;
the same command resumes a run, and a crash costs only the model it happened on::

    pip install -e ".[zoo]"
    python benchmarks/deploy_zoo.py                                  # both zoos, then the summary
    python benchmarks/deploy_zoo.py --zoo torchvision --models resnet18 mobilenet_v2
    python benchmarks/deploy_zoo.py --one timm:resnet10t             # one model, its record as JSON
    python benchmarks/deploy_zoo.py --summary deploy_zoo.jsonl       # the summary of a finished run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_zoo  # noqa: E402 - the zoo runner and timm's family ordering are shared

ZOOS = ("torchvision", "timm")
SIZES = (64, 96, 128, 224)
TIMM_SAMPLE = 56
TIMM_MAX_PARAMS = 30_000_000
FLAVOURS = ("integer", "qdq", "qonnx")
TORCHVISION_TRANSFORMERS = re.compile(r"^(vit_|swin_|maxvit)")
# module class names that make a model something other than a CNN: attention (timm's
# MHSA/GPSA of ConViT, SHSA/SHMA of SHViT/iFormer, LiteMLA of EfficientViT), recurrent or
# state-space (EfficientViM's HSMSSD) token mixers, MLP-Mixers
NOT_CNN = re.compile(r"attention|attn|mixer|lstm|gru|transformer|mha|mhsa|gpsa|shsa|shma|litemla|ssd$",
                     re.IGNORECASE)


def is_cnn(model) -> bool:
    """A model with a 2-d convolution and no attention, recurrent or token-mixing module."""
    import torch
    classes = [type(m) for m in model.modules()]
    return (any(issubclass(c, torch.nn.Conv2d) for c in classes)
            and not any(NOT_CNN.search(c.__name__) or issubclass(c, torch.nn.MultiheadAttention) for c in classes))


def timm_cnn_sample(n: int = TIMM_SAMPLE, max_params: int = TIMM_MAX_PARAMS) -> list[str]:
    """The smallest CNN of every timm family that has one, then seconds from the largest families."""
    import timm
    import torch

    families = {}
    for module in sorted(timm.list_modules()):
        names = sorted(timm.list_models(module=module), key=model_zoo._size_rank)
        if names:
            families[module] = names
    sample, rejected, rounds = [], set(), 0
    while len(sample) < n and rounds < 10:
        progress = False
        for module in sorted(families, key=lambda m: -len(families[m])) if rounds else sorted(families):
            for name in [m for m in families[module] if m not in sample and m not in rejected][:4]:
                try:
                    with warnings.catch_warnings(), torch.device("meta"):
                        warnings.simplefilter("ignore")
                        model = timm.create_model(name, pretrained=False)
                except Exception:  # noqa: BLE001 - a model that needs arguments: next candidate
                    rejected.add(name)
                    continue
                if sum(p.numel() for p in model.parameters()) <= max_params and is_cnn(model):
                    sample.append(name)
                    progress = True
                    break
                rejected.add(name)
            if rounds and len(sample) >= n:
                break
        rounds += 1
        if not progress:
            break
    return sample


def names(zoo: str) -> list[str]:
    if zoo == "torchvision":
        return [m for m in model_zoo.names("torchvision") if not TORCHVISION_TRANSFORMERS.match(m)]
    return timm_cnn_sample()


def build(zoo: str, name: str):
    """``(model, x)``: the model with 10 classes, ``x`` a batch of 2 of the smallest size it takes."""
    if zoo == "torchvision":
        import torchvision
        # deployment is inference: GoogLeNet / Inception without their training-only auxiliary heads
        extra = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
    else:
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return model, model_zoo._vision_batch(model, SIZES)


def _export_error(exc: Exception) -> str:
    return str(exc).strip()[:3000] or type(exc).__name__


def check(zoo: str, name: str, inputs: int = 64) -> dict:
    """Build, compile, train one step, export every flavour and compare; never raises."""
    import torch

    import fxcompile as fxc
    from fxcompile.deploy.export import export_onnx, verify

    torch.manual_seed(0)
    rec = {"zoo": zoo, "model": name, "status": "ok", "error": None, "flavours": {}}
    if zoo == "torchvision" and name in model_zoo.TORCHVISION_SKIP:
        return dict(rec, status="skipped", error=f"too large for one CPU step ({model_zoo.TORCHVISION_SKIP[name]})")
    t0 = time.perf_counter()
    try:
        model, x2 = build(zoo, name)
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="build_failed", error=model_zoo._first_line(exc))
    rec["size"] = x2.shape[-1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = fxc.compile(model, fxc.baseline(), loss_fn=torch.nn.CrossEntropyLoss(), example_inputs=(x2,))
            opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1e-3), q)
            out = q(x2)
            loss = q.loss(out[0] if isinstance(out, tuple) else out, torch.tensor([1, 2]))
            loss.backward()
            opt.step()
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="compile_or_train_failed", error=model_zoo._first_line(exc))
    q.eval()
    x = torch.randn(inputs, *x2.shape[1:], generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        for flavour in FLAVOURS:
            path = os.path.join(tmp, f"{flavour}.onnx")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_onnx(q, path, (x[:2],), flavour=flavour)
                rec["flavours"][flavour] = "ok"
                rec.setdefault("onnx_bytes", {})[flavour] = os.path.getsize(path)
            except Exception as exc:  # noqa: BLE001
                rec["flavours"][flavour] = _export_error(exc)
                continue
            if flavour == "integer":
                try:
                    r = verify(q, path, x, batch_size=16)
                    rec.update(ort_vs_integer=r["mismatches"], simulation_vs_integer=r["simulation_mismatches"],
                               output_codes=r["outputs"], top1_agreement=r["top1_agreement"])
                except Exception as exc:  # noqa: BLE001
                    rec.update(status="run_failed", error=model_zoo._first_line(exc))
    if rec["flavours"]["integer"] != "ok" and rec["status"] == "ok":
        rec["status"] = "export_failed"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def blockers(error: str) -> list[str]:
    """The op labels an ``ExportError`` names (``'node' (Op)``)."""
    return re.findall(r"'[^']+' \(([^)]+)\)", error.split(". What each op")[0])


def summary(records: list[dict]) -> str:
    lines = []
    for zoo in ZOOS:
        recs = [r for r in records if r["zoo"] == zoo and r["status"] != "skipped"]
        if not recs:
            continue
        skipped = [r for r in records if r["zoo"] == zoo and r["status"] == "skipped"]
        lines.append(f"{zoo}: {len(recs)} models ({len(skipped)} skipped: "
                     f"{', '.join(r['model'] for r in skipped) or '-'})")
        for flavour in FLAVOURS:
            ok = sum(r.get("flavours", {}).get(flavour) == "ok" for r in recs)
            lines.append(f"  {flavour:<8} exports {ok:>3} of {len(recs)} ({100 * ok / len(recs):.1f} %)")
        ran = [r for r in recs if "ort_vs_integer" in r]
        exact = [r for r in ran if r["ort_vs_integer"] == 0 and r["simulation_vs_integer"] == 0]
        lines.append(f"  bit-exact (0 differing codes ORT vs integer and simulation vs integer): "
                     f"{len(exact)} of {len(ran)} run; top-1 agreement min "
                     f"{min((r['top1_agreement'] for r in ran), default=float('nan')):.3f}")
        sizes = [(r["onnx_bytes"]["integer"], r["model"]) for r in recs if "integer" in r.get("onnx_bytes", {})]
        if sizes:
            size, model = max(sizes)
            lines.append(f"  largest integer ONNX file: {size / 2 ** 20:.1f} MiB ({model})")
        for r in ran:
            if r not in exact:
                lines.append(f"  NOT EXACT {r['model']}: ORT vs integer {r['ort_vs_integer']}, "
                             f"simulation vs integer {r['simulation_vs_integer']} of {r['output_codes']}")
        for flavour in ("qdq", "qonnx"):
            missing = [r["model"] for r in recs if r.get("flavours", {}).get("integer") == "ok"
                       and r["flavours"].get(flavour) != "ok"]
            if missing:
                lines.append(f"  {flavour} fails where integer exports: {', '.join(missing)}")
        counts = collections.Counter()
        for r in recs:
            error = r.get("flavours", {}).get("integer")
            if error and error != "ok":
                counts.update(set(blockers(error)))
        if counts:
            lines.append("  ops that stop the integer export (models): "
                         + ", ".join(f"{op} {k}" for op, k in counts.most_common()))
        for r in recs:
            if r["status"] != "ok":
                error = r.get("error") or r["flavours"].get("integer", "")
                lines.append(f"  FAILED {r['model']} [{r['status']}]: {error.splitlines()[0][:300] if error else ''}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", nargs="+", choices=ZOOS, default=list(ZOOS))
    p.add_argument("--models", nargs="+", help="only these models")
    p.add_argument("--limit", type=int, help="only the first N models of each zoo")
    p.add_argument("--inputs", type=int, default=64, help="random inputs each exported model runs on")
    p.add_argument("--one", help="ZOO:NAME, checked in this process; prints its record as JSON")
    p.add_argument("--out", default="deploy_zoo.jsonl", help="records, one JSON line each (resumable)")
    p.add_argument("--summary", metavar="FILE", help="print the summary of the records in FILE and stop")
    p.add_argument("--results", metavar="JSON", help="also write the counts and the records to this results file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a model may take")
    p.add_argument("--worker", choices=ZOOS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.summary:
        records = [r for r in model_zoo._done(args.summary).values() if r["status"] != "started"]
        print(summary(records))
        if args.results:
            write_results(args.results, records, argv)
        return
    if args.one:
        zoo, name = args.one.split(":", 1)
        print(json.dumps(check(zoo, name, args.inputs)))
        return
    if args.worker:
        model_zoo._worker(args.worker, args.models, args.out, check=lambda z, n: check(z, n, args.inputs))
        return
    records = []
    for zoo in args.zoo:
        models = args.models or names(zoo)
        models = models[:args.limit] if args.limit else models
        print(f"{zoo} ({len(models)} models): {', '.join(models)}", flush=True)
        records += model_zoo.run(zoo, models, args.out, args.timeout, script=os.path.abspath(__file__),
                                 extra=("--inputs", str(args.inputs)))
    print()
    print(summary(records))
    if args.results:
        write_results(args.results, records, argv)


def write_results(path: str, records: list[dict], argv) -> None:
    """Counts per zoo and flavour, and each model's record (errors cut to their first line)."""
    import datetime
    counts = {}
    for zoo in ZOOS:
        recs = [r for r in records if r["zoo"] == zoo and r["status"] != "skipped"]
        if recs:
            ran = [r for r in recs if "ort_vs_integer" in r]
            counts[zoo] = {"models": len(recs), **{f"{f}_exports": sum(r.get("flavours", {}).get(f) == "ok" for r in recs)
                                                   for f in FLAVOURS},
                           "bit_exact": sum(r["ort_vs_integer"] == 0 and r["simulation_vs_integer"] == 0 for r in ran),
                           "ran": len(ran)}
            sizes = [(r["onnx_bytes"]["integer"], r["model"]) for r in recs if "integer" in r.get("onnx_bytes", {})]
            if sizes:
                size, model = max(sizes)
                counts[zoo]["largest_integer_onnx"] = {"model": model, "MiB": round(size / 2 ** 20, 1)}
    slim = [{k: ({f: (v if v == "ok" else v.splitlines()[0][:300]) for f, v in val.items()} if k == "flavours" else val)
             for k, val in r.items()} for r in records]
    with open(path, "w") as f:
        json.dump({"command": "python benchmarks/deploy_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "date": datetime.date.today().isoformat(), "counts": counts, "records": slim}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
