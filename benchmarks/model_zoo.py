"""Which well-known models compile under fxcompile and train one step: three zoos.

* ``torchvision``: every classification builder (``torchvision.models.list_models``);
* ``timm``: a sample of at least 100 models spread over all of timm's model families (one
  small model per family, then a second from the families with most models), listed in the
  output;
* ``hf``: Hugging Face transformers architectures built from small configs.

Every model is built with random weights (never downloaded), compiled under the ``baseline``
policy with ``frontend="auto"`` and trained for one SGD step at batch 2; the record says
which front-end captured it and whether the loss was finite.  One worker process per zoo
checks the models in turn and appends one JSON line each to ``--out``; a crash costs only
the model it happened on, and running the same command again resumes::

    pip install -e ".[zoo]"
    python benchmarks/model_zoo.py                        # all three zoos, counts and failures
    python benchmarks/model_zoo.py --zoo timm --limit 20  # the first 20 of the timm sample
    python benchmarks/model_zoo.py --one hf:bert          # one model, its record as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings

ZOOS = ("torchvision", "timm", "hf")
TORCHVISION_SIZES = (64, 224, 299)
TIMM_SAMPLE = 104
TIMM_MAX_PARAMS = 60_000_000
# the two largest torchvision builders (633M and 644M parameters) need more memory than a
# small machine has for one training step; everything else runs
TORCHVISION_SKIP = {"vit_h_14": "632M parameters", "regnet_y_128gf": "645M parameters"}
# rank of a name token as a size: the smallest variant of a family first
_SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "micro", "small", "s", "b0", "lite0",
               "050", "075", "100", "18", "26", "34", "t", "m", "base", "b", "50")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:400] if text else ''}"


# ---- the zoos: names, and how to build each model with an example batch and a loss -----------

def _size_rank(name: str) -> tuple:
    tokens = re.split(r"[_\-.]", name)
    ranks = [_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS]
    return (min(ranks) if ranks else len(_SIZE_WORDS), len(name), name)


def timm_sample(n: int = TIMM_SAMPLE, max_params: int = TIMM_MAX_PARAMS) -> list[str]:
    """One small model from every timm family (module), then seconds from the largest families."""
    import timm
    import torch

    families = {}
    for module in sorted(timm.list_modules()):
        names = sorted(timm.list_models(module=module), key=_size_rank)
        if names:
            families[module] = names
    sample, rounds = [], 0
    while len(sample) < n and rounds < 10:
        for module in sorted(families, key=lambda m: -len(families[m])) if rounds else sorted(families):
            candidates = [m for m in families[module] if m not in sample]
            for name in candidates[:3]:  # the smallest that builds within the parameter budget
                try:
                    with torch.device("meta"):
                        params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
                except Exception:  # noqa: BLE001 - a model that needs arguments: next candidate
                    continue
                if params <= max_params:
                    sample.append(name)
                    break
            if rounds and len(sample) >= n:
                break
        rounds += 1
    return sample


def _hf_text(cls_name: str, config_name: str, classify: bool, **config):
    def build():
        import torch
        import transformers

        cfg = getattr(transformers, config_name)(**config, use_cache=False)  # training: no key/value cache
        model = getattr(transformers, cls_name)(cfg)
        ids = torch.randint(3, config.get("vocab_size", 100), (2, 12))
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0  # the second sequence is padded
        if classify:
            return model, {"input_ids": ids, "attention_mask": mask}, _logits_loss, torch.tensor([0, 1])
        return model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, "loss", None
    return build


def _hf_image(cls_name: str, config_name: str, **config):
    def build():
        import torch
        import transformers

        model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config))
        size = config.get("image_size", 32)
        return model, {"pixel_values": torch.randn(2, 3, size, size)}, _logits_loss, torch.tensor([0, 1])
    return build


def _logits_loss(output, target):
    import torch.nn.functional as F
    return F.cross_entropy(output["logits"], target)


_SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)
# _RMS_NOTE: RMSNorm squares and averages its input in separate ops, each cast: with the
# default initialisation (std 0.02) the mean square of a 32-wide hidden state is below the
# baseline's activation step (2^-8), rounds to 0 and rsqrt(0 + 1e-6 rounded to 0) is inf.
HF_MODELS = {
    "bert": _hf_text("BertForSequenceClassification", "BertConfig", True, **_SMALL),
    "roberta": _hf_text("RobertaForSequenceClassification", "RobertaConfig", True, **_SMALL, pad_token_id=1),
    "distilbert": _hf_text("DistilBertForSequenceClassification", "DistilBertConfig", True, vocab_size=100, dim=32,
                           n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
    "albert": _hf_text("AlbertForSequenceClassification", "AlbertConfig", True, embedding_size=16, **_SMALL),
    "electra": _hf_text("ElectraForSequenceClassification", "ElectraConfig", True, embedding_size=16, **_SMALL),
    "gpt2": _hf_text("GPT2LMHeadModel", "GPT2Config", False, vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                     n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neo": _hf_text("GPTNeoForCausalLM", "GPTNeoConfig", False, vocab_size=100, hidden_size=32, num_layers=2,
                        num_heads=2, attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                        window_size=8),
    "opt": _hf_text("OPTForCausalLM", "OPTConfig", False, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
    "llama": _hf_text("LlamaForCausalLM", "LlamaConfig", False, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                      initializer_range=0.1),  # see _RMS_NOTE
    "vit": _hf_image("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2),
    "convnext": _hf_image("ConvNextForImageClassification", "ConvNextConfig", image_size=32, hidden_sizes=[8, 16],
                          depths=[1, 1], num_stages=2, num_labels=2),
}


def names(zoo: str) -> list[str]:
    if zoo == "torchvision":
        import torchvision
        return torchvision.models.list_models(module=torchvision.models)
    if zoo == "timm":
        return timm_sample()
    return list(HF_MODELS)


def _vision_batch(model, sizes):
    import torch
    model.train()
    for size in sizes:  # the smallest input the model takes (Inception's auxiliary head needs more)
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001
            continue
    raise RuntimeError(f"the model runs eagerly on none of the sizes {sizes}")


def build(zoo: str, name: str):
    """``(model, inputs, loss_fn, target)``: inputs a tuple or a dict of keyword arguments."""
    import torch
    if zoo == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        return model, (_vision_batch(model, TORCHVISION_SIZES),), torch.nn.CrossEntropyLoss(), torch.tensor([1, 2])
    if zoo == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        return model, (_vision_batch(model, (size,)),), torch.nn.CrossEntropyLoss(), torch.tensor([1, 2])
    return HF_MODELS[name]()


def check(zoo: str, name: str) -> dict:
    """Build, compile (baseline, frontend="auto") and train ``name`` one step; never raises."""
    import torch

    import fxcompile as fxc

    torch.manual_seed(0)
    rec = {"zoo": zoo, "model": name, "status": "ok", "frontend": None, "error": None}
    if zoo == "torchvision" and name in TORCHVISION_SKIP:
        return dict(rec, status="skipped", error=f"too large for one CPU training step ({TORCHVISION_SKIP[name]})")
    t0 = time.perf_counter()
    try:
        model, inputs, loss_fn, target = build(zoo, name)
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="build_failed", error=_first_line(exc))
    rec["params"] = sum(p.numel() for p in model.parameters())
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = fxc.compile(model, fxc.baseline(), loss_fn=loss_fn, example_inputs=inputs, frontend="auto")
    except Exception as exc:  # noqa: BLE001
        return dict(rec, status="compile_failed", error=_first_line(exc), seconds=round(time.perf_counter() - t0, 1))
    rec["frontend"] = q.meta.get("fxc_frontend")
    rec["casts"] = len(list(q.casts.children()))
    if args and hasattr(args[0], "shape"):
        rec["size"] = args[0].shape[-1]
    try:
        opt = fxc.fixed_point_optimizer(torch.optim.SGD(q.parameters(), lr=1e-3), q)
        out = q(*args, **kwargs)
        if isinstance(out, tuple) and zoo != "hf":  # GoogLeNet / Inception in training mode: (logits, aux...)
            out = out[0]
        loss = q.loss(out, target)
        loss.backward()
        opt.step()
        rec["loss"] = float(loss)
        if not torch.isfinite(loss):
            rec.update(status="nonfinite_loss", error=f"loss {float(loss)}")
    except Exception as exc:  # noqa: BLE001
        rec.update(status="train_failed", error=_first_line(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# ---- running: one worker per zoo, resumable ----------------------------------------------------

def _done(path: str) -> dict:
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    records[(rec["zoo"], rec["model"])] = rec
    return records


def _worker(zoo: str, models: list[str], out: str, check=check) -> None:
    """Check ``models`` in turn with ``check(zoo, name)``; a ``started`` line before each lets
    the parent name a crash."""
    done = _done(out)
    for name in models:
        if (zoo, name) in done and done[(zoo, name)]["status"] != "started":
            continue
        with open(out, "a") as f:
            f.write(json.dumps({"zoo": zoo, "model": name, "status": "started"}) + "\n")
        rec = check(zoo, name)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{zoo:<12} {name:<40} {rec['status']:<15} {rec.get('frontend') or '-':<7} "
              f"{rec.get('seconds', '')!s:>6}  {(rec.get('error') or '')[:160]}", flush=True)


def run(zoo: str, models: list[str], out: str, timeout: float, script: str = __file__, extra=()) -> list[dict]:
    """Run ``models`` of ``zoo`` in worker processes (``script --worker ZOO *extra``) until each has a record."""
    while True:
        done = _done(out)
        started = [m for m in models if done.get((zoo, m), {}).get("status") == "started"]
        for name in started:  # the worker died on it: record that and go on with the rest
            with open(out, "a") as f:
                f.write(json.dumps({"zoo": zoo, "model": name, "status": "crashed",
                                    "error": "the worker process died on this model"}) + "\n")
        done = _done(out)
        todo = [m for m in models if (zoo, m) not in done]
        if not todo:
            return [done[(zoo, m)] for m in models]
        cmd = [sys.executable, script, "--worker", zoo, *extra, "--out", out, "--models", *todo]
        try:
            subprocess.run(cmd, timeout=timeout * len(todo))
        except subprocess.TimeoutExpired:
            pass


def summary(records: list[dict]) -> str:
    lines = []
    for zoo in ZOOS:
        recs = [r for r in records if r["zoo"] == zoo]
        if not recs:
            continue
        ok = [r for r in recs if r["status"] == "ok"]
        skipped = [r for r in recs if r["status"] == "skipped"]
        failed = [r for r in recs if r["status"] not in ("ok", "skipped")]
        tried = len(recs) - len(skipped)
        by_front = {f: sum(r.get("frontend") == f for r in ok) for f in ("fx", "export", "leaf")}
        lines.append(f"{zoo}: {len(ok)} of {tried} train one step ({100 * len(ok) / max(tried, 1):.1f} %; "
                     f"captured by fx {by_front['fx']}, export {by_front['export']}, leaf {by_front['leaf']}), "
                     f"{len(skipped)} skipped, {len(failed)} failed")
        lines += [f"  skipped {r['model']}: {r['error']}" for r in skipped]
        lines += [f"  FAILED {r['model']} [{r['status']}]: {r.get('error')}" for r in failed]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", nargs="+", choices=ZOOS, default=list(ZOOS))
    p.add_argument("--limit", type=int, help="only the first N models of each zoo")
    p.add_argument("--models", nargs="+", help="only these models")
    p.add_argument("--one", help="ZOO:NAME, checked in this process; prints its record as JSON")
    p.add_argument("--out", default="model_zoo.jsonl", help="records, one JSON line each (resumable)")
    p.add_argument("--timeout", type=float, default=900, help="seconds a model may take")
    p.add_argument("--worker", choices=ZOOS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.one:
        zoo, name = args.one.split(":", 1)
        print(json.dumps(check(zoo, name)))
        return
    if args.worker:
        _worker(args.worker, args.models, args.out)
        return
    records = []
    for zoo in args.zoo:
        models = args.models or names(zoo)
        models = models[:args.limit] if args.limit else models
        if zoo == "timm":
            print(f"timm sample ({len(models)} models): {', '.join(models)}", flush=True)
        records += run(zoo, models, args.out, args.timeout)
    print()
    print(summary(records))


if __name__ == "__main__":
    main()
