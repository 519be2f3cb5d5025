"""The ``fxcompile`` command line: ``demo``, ``train``, ``inspect`` and friends.

Each command is a pair of functions here, ``add_<name>(subparsers)`` and ``run_<name>(args)``;
a new command is one more pair and one more name in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys

import torch

__all__ = ["main", "COMMANDS"]


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="Fashion-MNIST root: a folder with the four IDX files "
                   "(default: $FXCOMPILE_DATA)")
    p.add_argument("--train-subset", type=int, default=None, help="train on this many images (default: all)")


def _load_data(args):
    from .experiments.data import fashion_mnist
    return fashion_mnist(args.data, train_subset=args.train_subset)


# ---- demo -----------------------------------------------------------------------------------

def add_demo(sub):
    p = sub.add_parser("demo", help="train the seed CNN in FP32 and under the study's baseline, side by side")
    _data_flags(p)
    p.set_defaults(train_subset=12000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--policy", default="baseline", help="policy name or file (default: baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx", default=None, help="write the exported integer ONNX model here "
                   "(default: a temporary file)")
    p.add_argument("--timing-steps", type=int, default=60,
                   help="steps of each model timed side by side for the step-time ratio (default 60)")


def run_demo(args):
    from . import inspect
    from .runtime import kernels
    from .training.train import TrainConfig, step_times_side_by_side, train
    train_data, test_data = _load_data(args)
    kernels.load()  # a first run builds the kernel here (one line says so), before anything is timed
    print(f"training the seed CNN on {len(train_data[0])} Fashion-MNIST images for {args.epochs} epoch(s), "
          f"evaluating on all {len(test_data[0])} test images")
    configs = [TrainConfig(policy=policy, epochs=args.epochs, seed=args.seed) for policy in (None, args.policy)]
    rows = [train(cfg, train_data, test_data) for cfg in configs]
    # timed apart from training, side by side after warm-up: sequential runs on a busy machine
    # would compare different loads rather than the two kinds of step
    times = step_times_side_by_side(configs, train_data, steps=args.timing_steps)
    fp32, fx = rows
    print()
    print(f"{'':<12}{'test accuracy':>14}{'step time':>12}")
    for r, t in zip(rows, times):
        print(f"{r['policy']:<12}{100 * r['accuracy']:>13.2f}%{1e3 * t:>10.2f}ms")
    print(f"accuracy difference: {100 * (fx['accuracy'] - fp32['accuracy']):+.2f} points; "
          f"step-time ratio (fixed point / FP32): {times[1] / times[0]:.2f} "
          f"(median of {args.timing_steps} steps each, taken in turns after warm-up; kernel: {kernels.backend()})")
    print()
    print(inspect(fx["model_object"]))
    _demo_export(fx["model_object"], test_data, args.onnx)


def _demo_export(qmodel, test_data, path):
    import tempfile
    from .deploy.export import export_onnx, verify
    path = path or tempfile.mkstemp(prefix="fxcompile-demo-", suffix=".onnx")[1]
    export_onnx(qmodel, path, example_inputs=(test_data[0][:1],))
    r = verify(qmodel, path, *test_data)
    print()
    print(f"exported the integer graph to {path}; ONNX Runtime on all {r['images']} test images:")
    print(f"  accuracy {100 * r['ort_accuracy']:.2f}% (fixed-point simulation {100 * r['simulation_accuracy']:.2f}%)")
    print(f"  bit-exactness: {r['mismatches']} of {r['outputs']} output codes differ from the integer reference")
    print(f"  top-1 agreement with the simulation {100 * r['top1_agreement']:.2f}%, "
          f"largest output-code difference {r['max_code_difference']}")


# ---- train ----------------------------------------------------------------------------------

def _dataset_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data set (--dataset imagefolder:DIR reads a folder of class subfolders)")
    g.add_argument("--dataset", default="fashion_mnist",
                   help="fashion_mnist (default), synthetic, or imagefolder:DIR (torchvision ImageFolder: DIR holds one "
                   "subfolder per class, or train/ and test/ (or val/) each holding them)")
    g.add_argument("--image-size", type=int, default=None, help="resize images to this square size "
                   "(default: the first image's size)")
    g.add_argument("--mean", default=None, help="per-channel normalisation mean, e.g. 0.485,0.456,0.406 "
                   "(default: measured on the training images)")
    g.add_argument("--std", default=None, help="per-channel normalisation std (default: measured)")
    g.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class held out for testing when DIR has no train/test folders (default 0.2)")
    g.add_argument("--grayscale", action="store_true", help="read images as one channel instead of RGB")


def _floats(text):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"fxcompile: --mean/--std take comma-separated numbers, got {text!r}") from None


def _load_dataset(args):
    """(train, test, info) from --dataset and its flags (Fashion-MNIST from --data)."""
    from .experiments.data import load
    return load(args.dataset, args.data, getattr(args, "train_subset", None), image_size=args.image_size,
                mean=_floats(args.mean), std=_floats(args.std), test_fraction=args.test_fraction,
                grayscale=args.grayscale)


def _policy_arg(text: str):
    """``fp32`` -> None, ``auto:K`` -> fxc.auto(max_formats=K), else the name or file as given."""
    if text == "fp32":
        return None
    if text.startswith("auto:"):
        from .core.auto import auto
        try:
            return auto(max_formats=int(text[5:]))
        except ValueError:
            raise SystemExit(f"fxcompile: --policy auto:K wants a whole number K of distinct formats, got {text!r}") from None
    return text


def add_train(sub):
    p = sub.add_parser("train", help="train a model in FP32 or under a policy (Fashion-MNIST or your images)")
    _data_flags(p)
    _dataset_flags(p)
    p.add_argument("--model", default="seed_cnn", help="seed_cnn, mlp, residual_cnn, a torchvision model (resnet18), "
                   "a timm model (timm:NAME; pip install timm), or module:callable returning an nn.Module")
    p.add_argument("--policy", default="fp32", help="fp32, baseline, optimized, 8bit, a .toml/.json policy file, or auto:K "
                   "(the cost model chooses at most K formats, calibrated on the first training batches)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--weight-rounding", choices=["nearest", "stochastic", "floor", "toward_zero"], default=None)
    p.add_argument("--loss-scale", type=float, default=1, metavar="2**S", help="multiply the loss's gradient by "
                   "this power of two before the backward casts round it, and divide the weights' gradients by it "
                   "before each step (default 1: off; fixed-point policies only)")
    p.add_argument("--prediction-gradient", default=None, choices=["inward"],
                   help="inward: a saturated logit keeps the part of its gradient that moves it back into range "
                   "(default: the policy's setting; fixed-point policies only)")
    p.add_argument("--out", default=None, help="write metrics to this .json or .csv file")
    p.add_argument("--save", default=None, metavar="FILE", help="save the trained weights with what export and "
                   "run-onnx need (model, policy, data set); one file per seed when several: FILE-seed<N>.pt")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint atomically into this folder "
                   "(one subfolder per seed); keeps the last two")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100; "
                   "epoch ends are always checkpointed)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in "
                   "--checkpoint-dir (a run killed at any point ends as if never interrupted)")
    p.add_argument("--telemetry", type=int, default=0, metavar="N",
                   help="count overflow/underflow/NaN on every edge, one step in N (0: off)")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="log loss, accuracy, learning rate, per-edge "
                   "telemetry and value/gradient histograms to DIR/seed-<N> (pip install tensorboard)")
    p.add_argument("--tensorboard-every", type=int, default=50, metavar="N",
                   help="steps between telemetry scalars and histograms (default 50)")
    r = p.add_argument_group("formats that follow training (fixed-point policies; see fxcompile.training.reassign)")
    r.add_argument("--reassign-every", type=int, default=0, metavar="N",
                   help="move the casts' binary points every N steps, predicted from each edge's range history")
    r.add_argument("--reassign-saturation", type=float, default=None, metavar="RATE",
                   help="also re-assign after an observed step where an edge saturates more than RATE")
    r.add_argument("--reassign-underflow", type=float, default=None, metavar="RATE",
                   help="also re-assign after an observed step where an edge flushes more than RATE of its "
                   "nonzero values to zero")
    r.add_argument("--reassign-rechoose", action="store_true",
                   help="re-run the solver at each re-assignment (edges may change format; still at most K)")
    r.add_argument("--reassign-headroom", type=int, default=1, metavar="OCTAVES",
                   help="octaves of growth beyond the predicted one each format is scored for (default 1)")


def _reassign_arg(args):
    if not (args.reassign_every or args.reassign_saturation is not None or args.reassign_underflow is not None):
        return None
    from .errors import FxcompileError
    from .training.reassign import Reassign
    try:
        return Reassign(every=args.reassign_every, saturation=args.reassign_saturation,
                        underflow=args.reassign_underflow, rechoose=args.reassign_rechoose,
                        headroom=args.reassign_headroom)
    except FxcompileError as e:
        raise SystemExit(f"fxcompile: {e}") from None


def _save_run(path, model, qmodel, args, info, policy, seed, calibration=None, schedule=None):
    """Weights of the plain model plus what rebuilding it for export needs."""
    from .core.auto import Auto
    from .reports.inspect import assignment
    meta = {"model": args.model, "seed": seed, "num_classes": len(info["classes"]), "dataset": args.dataset, "data": info,
            "input_shape": [1, info["channels"], *info["image_size"]]}
    if isinstance(policy, Auto):
        import dataclasses
        meta["policy"] = {"auto": dataclasses.asdict(policy)}
        meta["calibration"] = calibration
        meta["assignment"] = assignment(qmodel).to_json()   # export checks it chose the same formats
        if schedule is not None:   # the formats moved during training: export starts from compile's, then moves
            meta["assignment"] = schedule.initial_assignment
            meta["formats"] = schedule.state_dict()["formats"]
    elif policy is not None:
        from .core.policy import Policy
        meta["policy"] = Policy.coerce(policy).to_dict()
        if schedule is not None:
            meta["formats"] = schedule.state_dict()["formats"]
    torch.save({"model": model.state_dict(), "fxcompile": meta}, path)


def _with_prediction_gradient(policy, value: str):
    """``policy`` (an Auto, or a policy name or file) with ``prediction_gradient=value``."""
    import dataclasses
    from .core.auto import Auto
    from .core.policy import Policy
    if policy is None:
        raise SystemExit("fxcompile: --prediction-gradient sets how fixed-point casts pass gradients; "
                         "the fp32 policy has none")
    if isinstance(policy, Auto):
        return dataclasses.replace(policy, prediction_gradient=value)
    try:
        loaded = Policy.coerce(policy)
    except Exception as e:  # noqa: BLE001 - a bad name or file: say which
        raise SystemExit(f"fxcompile: --policy {policy}: {e}") from None
    return Policy.from_dict({**loaded.to_dict(), "prediction_gradient": value})


def run_train(args):
    from .core.auto import Auto
    from .experiments.models import build
    from .training.train import TrainConfig, calibration_batches, train, write_metrics
    policy = _policy_arg(args.policy)
    if args.prediction_gradient is not None:
        policy = _with_prediction_gradient(policy, args.prediction_gradient)
    reassign = _reassign_arg(args)
    if reassign is not None and policy in (None, "fp32"):
        raise SystemExit("fxcompile: --reassign-* moves fixed-point formats; the fp32 policy has none")
    if args.resume and not args.checkpoint_dir:
        raise SystemExit("fxcompile: --resume needs --checkpoint-dir DIR (the folder the run checkpointed into)")
    if args.checkpoint_every < 1 or args.telemetry < 0 or args.tensorboard_every < 1:
        raise SystemExit("fxcompile: --checkpoint-every and --tensorboard-every must be >= 1 and --telemetry >= 0")
    if args.tensorboard:
        from .training.tensorboard import require_tensorboard
        try:
            require_tensorboard()
        except ImportError as e:
            raise SystemExit(f"fxcompile: {e}") from None
    train_data, test_data, info = _load_dataset(args)
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)  # the model's initial weights follow the seed
        try:
            model = build(args.model, num_classes=len(info["classes"]), in_channels=info["channels"])
        except ValueError as e:
            raise SystemExit(f"fxcompile: {e}") from None
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(model=model, policy=policy, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, seed=seed, weight_rounding=args.weight_rounding, loss_scale=args.loss_scale,
                          checkpoint_every=args.checkpoint_every, telemetry=args.telemetry,
                          tensorboard=f"{args.tensorboard}/seed-{seed}" if args.tensorboard else None,
                          tensorboard_every=args.tensorboard_every, reassign=reassign)
        m = train(cfg, train_data, test_data, resume=args.resume,
                  checkpoint_dir=f"{args.checkpoint_dir}/seed-{seed}" if args.checkpoint_dir else None)
        if args.resume:
            print(f"{args.policy} seed {seed}: resumed at step {m['start_step']}, ran {m['steps_run']} steps",
                  flush=True)
        m["model"] = args.model
        history = ", ".join(f"{100 * h['accuracy']:.2f}" for h in m["history"])
        print(f"{args.policy} seed {seed}: test accuracy {100 * m['accuracy']:.2f}% (per epoch: {history})", flush=True)
        if args.save:
            path = args.save if len(args.seeds) == 1 else f"{args.save.removesuffix('.pt')}-seed{seed}.pt"
            calibration = None
            if isinstance(policy, Auto):  # export chooses the same formats from the same statistics
                calibration = {"initial": initial, "batches": calibration_batches(cfg, train_data,
                                                                                  policy.calibration_batches)}
            _save_run(path, model, m["model_object"], args, info, policy, seed, calibration,
                      m.get("schedule_object"))
            print(f"saved {path} (fxcompile export OUT.onnx --state-dict {path} exports it)")
        runs.append(m)
    accs = [100 * r["accuracy"] for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{args.policy}: {statistics.fmean(accs):.2f} ± {std:.2f} % over {len(accs)} seed(s)")
    if args.out:
        write_metrics(runs, args.out)


# ---- inspect --------------------------------------------------------------------------------

def _load_callable(spec: str):
    if ":" not in spec:
        raise SystemExit(f"fxcompile: give the model as module:callable (e.g. fxcompile.experiments.models:SeedCNN), got {spec!r}")
    mod, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fxcompile: cannot load {spec!r}: {e}") from None
    return obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj


def add_inspect(sub):
    p = sub.add_parser("inspect", help="compile a model given as module:callable and print its edge table")
    p.add_argument("model", help="module:callable returning an nn.Module, e.g. fxcompile.experiments.models:SeedCNN")
    p.add_argument("--policy", default="baseline")
    p.add_argument("--input-shape", default="1,1,28,28", help="example input shape (comma separated)")
    p.add_argument("--leaf", action="append", default=[], help="module path to keep as a leaf (repeatable)")
    p.add_argument("--frontend", default="auto", choices=["fx", "export", "auto"])
    p.add_argument("--edges", action="store_true", help="one row per edge (producer->consumer) instead of one per value")
    p.add_argument("--dot", help="also write the rewritten graph as Graphviz DOT to this file")
    p.add_argument("--svg", help="also draw the rewritten graph as SVG to this file, casts coloured by format")
    p.add_argument("--json", help="also write the Assignment as JSON to this file")
    a = p.add_argument_group("cost model (--assignment): calibrate, let fxc.auto choose, report noise and hardware")
    a.add_argument("--assignment", action="store_true",
                   help="choose formats with fxc.auto instead of --policy and print predicted noise per edge")
    a.add_argument("--max-formats", type=int, default=3, help="K: distinct (bits, frac) formats allowed")
    a.add_argument("--bits", default="16", help="16, 8/16 (a choice of widths), or per role: activation=8,gradient=8,weight=16")
    a.add_argument("--objective", default="sensitivity", choices=["nsr", "reach", "sensitivity"],
                   help="what the formats minimise (default: sensitivity, the loss-weighted error)")
    a.add_argument("--gradient-rounding", default="nearest", choices=["nearest", "stochastic"])
    a.add_argument("--margin", type=int, default=None,
                   help="octaves of drift allowed for (default: 4 for formats of 12 bits or more, else 1)")
    a.add_argument("--output-margin", type=int, default=None,
                   help="octaves the model's output may grow beyond --margin (default: --margin's value)")
    a.add_argument("--weight-memory-bits", type=int, default=None, help="budget: total bits of weights and biases")
    a.add_argument("--bops", type=float, default=None,
                   help="budget: bit-operations per sample (MACs x activation bits x weight bits)")
    a.add_argument("--data", help="calibrate on Fashion-MNIST training batches from this root "
                   "(default: random inputs of --input-shape)")
    a.add_argument("--calibration-batches", type=int, default=4)
    a.add_argument("--profile", help="write the per-edge |value|/|gradient| profile PNG here")
    a.add_argument("--noise-vs-k", help="write the objective-vs-K plot PNG here")
    a.add_argument("--calibration-json", help="write the calibration statistics as JSON here")


def _auto_compile(args, model, shape):
    from . import auto, compile
    from .training.train import TrainConfig, calibration_batches
    from .core.auto import parse_bits
    bits = parse_bits(args.bits)
    policy = auto(max_formats=args.max_formats, bits=bits, objective=args.objective,
                  gradient_rounding=args.gradient_rounding, margin=args.margin, output_margin=args.output_margin,
                  weight_memory_bits=args.weight_memory_bits, bops=args.bops)
    if args.data:
        from .experiments.data import fashion_mnist
        train_data, _ = fashion_mnist(args.data, train_subset=args.calibration_batches * 32)
        batches = calibration_batches(TrainConfig(), train_data, args.calibration_batches)
    else:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            classes = model(torch.randn(shape, generator=g)).shape[1]
        batches = [(torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
                   for _ in range(args.calibration_batches)]
    return compile(model, policy, loss_fn=torch.nn.CrossEntropyLoss(), example_inputs=(batches[0][0][:1],),
                   leaf_modules=args.leaf, frontend=args.frontend, calibration_data=batches)


def run_inspect(args):
    from . import assignment, compile, inspect, to_dot
    model = _load_callable(args.model)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    if args.assignment:
        q = _auto_compile(args, model, shape)
    else:
        q = compile(model, args.policy, example_inputs=(torch.randn(shape),), leaf_modules=args.leaf,
                    frontend=args.frontend)
    print(inspect(q, edges=args.edges))
    if args.assignment:
        from .passes.calibrate import save_calibration
        from .reports.profile import plot_noise_vs_k, plot_profile
        if args.profile:
            plot_profile(q, args.profile)
        if args.noise_vs_k:
            plot_noise_vs_k(q, args.noise_vs_k)
        if args.calibration_json:
            save_calibration(q, args.calibration_json)
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(to_dot(q))
    if args.svg:
        from .reports.inspect import to_svg
        with open(args.svg, "w") as f:
            f.write(to_svg(q))
    if args.json:
        with open(args.json, "w") as f:
            f.write(assignment(q).to_json())


# ---- sweep / report -------------------------------------------------------------------------

def add_sweep(sub):
    p = sub.add_parser("sweep", help="run a sweep file (grid of policies/hyperparameters x seeds) into a CSV; "
                       "re-running resumes")
    p.add_argument("files", nargs="+", help="sweep TOML file(s); several files make one deduplicated sweep")
    p.add_argument("--out", help="results CSV (default: the file's 'output' or results/<name>.csv)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process pool, one torch thread per worker; ray: Ray tasks")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--data", help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 instead of the files' seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [defaults] key of every file, e.g. --set epochs=2 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the points and runs, train nothing")
    p.add_argument("--tensorboard", default=None, metavar="DIR", help="log each run (loss, accuracy, lr, per-edge "
                   "telemetry, histograms) to DIR/<point>-seed<N> (pip install tensorboard)")


def _parse_set(items):
    import tomllib
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"fxcompile: --set takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def run_sweep(args):
    from .experiments.sweep import load_sweep, read_rows, run_sweep as run
    sweep = load_sweep(args.files, overrides=_parse_set(args.set),
                       seeds=list(range(args.seeds)) if args.seeds else None)
    out = args.out or sweep.output or f"results/{sweep.name}.csv"
    if args.dry_run:
        for p in sweep.points:
            print(f"{p.id}  {p.config['dataset']:<13} {p.config['model']:<10} {p.config['policy_name']:<10} "
                  f"epochs {p.config['epochs']} batch {p.config['batch_size']}  {p.label}")
        print(f"{len(sweep.points)} points x {len(sweep.seeds)} seeds = {len(sweep.runs)} runs -> {out}")
        return
    if args.tensorboard:
        from .training.tensorboard import require_tensorboard
        try:
            require_tensorboard()
        except ImportError as e:
            raise SystemExit(f"fxcompile: {e}") from None
    run(sweep, out, executor=args.executor, workers=args.workers, root=args.data, ray_address=args.ray_address,
        tensorboard=args.tensorboard)
    print(f"{len(read_rows(out))} finished runs in {out}")


def add_report(sub):
    p = sub.add_parser("report", help="statistics, plots and a Markdown summary of sweep results")
    p.add_argument("files", nargs="+", help="results CSV file(s) written by 'fxcompile sweep', or JSON file(s) "
                   "written by examples/auto_formats.py --results (objective vs accuracy, budget Pareto plots)")
    p.add_argument("--out", default=None, help="folder for plots and summary.md (default: <first CSV>_report)")


def run_report(args):
    from .experiments.report import report
    print(report(args.files, args.out))


# ---- export / run-onnx ---------------------------------------------------------------------

def _trained_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags :func:`_trained_model` reads; a file saved by ``train --save`` supplies the defaults."""
    p.add_argument("--model", default=None, help="seed_cnn, mlp, residual_cnn, a torchvision or timm model, or "
                   "module:callable (default: the one --state-dict was trained as, else seed_cnn)")
    p.add_argument("--policy", default=None, help="the policy it was trained under (name or file; default: the "
                   "one --state-dict records, else baseline)")
    p.add_argument("--state-dict", default=None, help="a file written by 'fxcompile train --save', or weights saved "
                   "with torch.save(model.state_dict()) (or a dict holding them under 'model'); default: untrained")
    p.add_argument("--input-shape", default=None, help="example input shape, comma separated (default: the "
                   "--state-dict's data, else 1,1,28,28)")
    p.add_argument("--num-classes", type=int, default=None, help="outputs of a model built by name (default: the "
                   "--state-dict's data, else 10)")


def add_export(sub):
    p = sub.add_parser("export", help="export a trained model as an integer ONNX graph (no training)")
    p.add_argument("output", help="the .onnx file to write")
    _trained_model_flags(p)
    p.add_argument("--flavour", default="integer", choices=["integer", "qdq", "qonnx"],
                   help="integer: int64 ops, bit-exact on ONNX Runtime (default); qdq: float ops with "
                   "QuantizeLinear/DequantizeLinear pairs; qonnx: float ops with QONNX Quant nodes (FINN, hls4ml)")
    p.add_argument("--uint8-activations", action="store_true",
                   help="qdq only: signed 8-bit activations as uint8 codes (the form ONNX Runtime fuses throughout)")
    p.add_argument("--fold-batch-norms", action="store_true",
                   help="qdq only: fold each batch norm after a conv into it (per-channel weight scales; one "
                   "rounding fewer than the simulation)")


def _trained_model(args):
    """The model named by --model with the weights of --state-dict, a zero example input, and
    the policy (with its calibration, for an ``auto:K`` run) to compile it under."""
    from .experiments.models import build
    state, meta = None, {}
    if args.state_dict:
        try:
            state = torch.load(args.state_dict, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds
            raise SystemExit(f"fxcompile: cannot read weights from {args.state_dict}: {str(e).splitlines()[0]}") from None
        meta = state.get("fxcompile", {}) if isinstance(state, dict) else {}
        state = state.get("model", state) if isinstance(state, dict) else state
    name = args.model or meta.get("model", "seed_cnn")
    shape = (tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape
             else tuple(meta.get("input_shape", (1, 1, 28, 28))))
    try:
        model = build(name, num_classes=args.num_classes or meta.get("num_classes", 10))
    except ValueError as e:
        raise SystemExit(f"fxcompile: {e}") from None
    policy, calibration = args.policy, None
    if policy is None:
        recorded = meta.get("policy", "baseline")
        if isinstance(recorded, dict) and "auto" in recorded:
            from .core.auto import Auto
            policy, calibration = Auto(**recorded["auto"]), {**meta["calibration"], "assignment": meta["assignment"]}
        elif isinstance(recorded, dict):
            from .core.policy import Policy
            policy = Policy.from_dict(recorded, where=args.state_dict)
        else:
            policy = recorded or "baseline"
    elif policy.startswith("auto:"):
        raise SystemExit("fxcompile: an auto:K policy is chosen from calibration during training: export the file "
                         "'fxcompile train --policy auto:K --save FILE' wrote, without --policy")
    if calibration is not None:  # the formats are chosen again, exactly as training chose them
        model.load_state_dict(calibration["initial"])
    elif state is not None:
        _load_weights(model, state, args, name)
    formats = meta.get("formats") if args.policy is None else None   # the schedule's, for the recorded policy
    return model, torch.zeros(shape), policy, (calibration, state, meta.get("seed", 0), formats)


def _load_weights(model, state, args, name):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"fxcompile: {args.state_dict} does not fit {name}: {e}") from None


def _compile_for_deployment(model, policy, x, recorded=(None, None, 0), args=None):
    from . import compile, fixed_point_optimizer
    calibration, state, seed = recorded[:3]
    formats = recorded[3] if len(recorded) > 3 else None   # where a format schedule ended training
    if calibration is not None:
        torch.manual_seed(seed)
        qmodel = compile(model, policy, loss_fn=torch.nn.CrossEntropyLoss(), example_inputs=(x,),
                         calibration_data=calibration["batches"])
        _load_weights(model, state, args, "the model")  # parameters are shared with qmodel
        qmodel = qmodel.eval()
        from .core.assignment import Assignment
        from .reports.inspect import assignment
        differ = assignment(qmodel).diff(Assignment.from_json(calibration["assignment"]))
        if differ:
            raise SystemExit(f"fxcompile: choosing the formats again from the recorded calibration gave different "
                             f"formats on {len(differ)} edge(s), first {differ[0][0]}; the file may come from another "
                             "fxcompile version: retrain with --save")
    else:
        qmodel = compile(model, policy, example_inputs=(x,)).eval()
    if formats is not None:
        from .training.reassign import apply_formats
        apply_formats(qmodel, formats)
    # weights trained in fixed point are on their grid already; others are rounded once here
    fixed_point_optimizer(torch.optim.SGD(qmodel.parameters(), lr=0.0), qmodel, rounding="nearest")
    return qmodel


def run_export(args):
    from .deploy.export import export_onnx, integer_graph
    model, x, policy, recorded = _trained_model(args)
    qmodel = _compile_for_deployment(model, policy, x, recorded, args)
    options = {k: True for k in ("uint8_activations", "fold_batch_norms") if getattr(args, k)}
    if options and args.flavour != "qdq":
        raise SystemExit(f"fxcompile export: --{next(iter(options)).replace('_', '-')} applies to --flavour qdq "
                         f"only, not {args.flavour}")
    exported = export_onnx(qmodel, args.output, example_inputs=(x,), flavour=args.flavour, **options)
    if args.flavour != "integer":
        quantizers = [n for n in exported.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Quant")]
        print(f"wrote {args.output}: {args.flavour} model, {len(exported.graph.node)} nodes of which "
              f"{len(quantizers)} quantizers; input 'x', output 'output' (float, not bit-exact)")
        return
    ops = integer_graph(qmodel, (x,)).ops
    print(f"wrote {args.output}: {len(ops)} integer ops "
          f"({', '.join(sorted({op.op for op in ops}))}); input 'x', outputs 'output' and 'output_codes'")


def add_run_onnx(sub):
    p = sub.add_parser("run-onnx", help="evaluate an exported ONNX model with ONNX Runtime on the test set")
    p.add_argument("model", help="an .onnx file written by 'fxcompile export'")
    p.add_argument("--data", help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    _dataset_flags(p)
    p.set_defaults(train_subset=1)  # only the test images are used
    p.add_argument("--batch-size", type=int, default=500)


def run_run_onnx(args):
    import time
    from .deploy.export import onnx_session
    from .deploy.backends.integer import count_non_finite, non_finite_message
    _, (x, y), _ = _load_dataset(args)  # the same split and normalisation as training
    try:
        session = onnx_session(args.model)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise SystemExit(f"fxcompile: cannot load {args.model} with ONNX Runtime: {e}") from None
    name = session.get_inputs()[0].name
    # the exported quantizer has no NaN code: say how many inputs it had to map (see quantize_input)
    counts = count_non_finite(x)
    print(non_finite_message(name, counts) if counts["samples"] else f"input {name!r}: no NaN or ±Inf values")
    correct, t0 = 0, time.perf_counter()
    for i in range(0, len(x), args.batch_size):
        out = session.run(None, {name: x[i:i + args.batch_size].numpy()})[0]
        correct += int((torch.from_numpy(out).argmax(1) == y[i:i + args.batch_size]).sum())
    seconds = time.perf_counter() - t0
    print(f"{args.model}: accuracy {100 * correct / len(x):.2f}% on {len(x)} test images "
          f"(ONNX Runtime CPU, {1e3 * seconds / len(x):.3f} ms/image)")


def add_hls4ml(sub):
    p = sub.add_parser("hls4ml", help="write an hls4ml project bit-exact with the integer graph (needs the hls extra)")
    p.add_argument("output_dir", help="the hls4ml project folder to write")
    _trained_model_flags(p)
    p.add_argument("--backend", default="Vivado", help="hls4ml backend (default Vivado)")
    p.add_argument("--part", default=None, help="FPGA part (default: the backend's)")
    p.add_argument("--reuse-factor", type=int, default=None, metavar="R",
                   help="products per multiplier (default: the auto policy's hls4ml_reuse_factor, else 1)")
    p.add_argument("--compile", action="store_true", help="also build the C simulation with g++")


def run_hls4ml(args):
    from .deploy.backends.hls4ml import deployed_reuse_factor, hls_plan, require_hls4ml, to_hls4ml
    from .errors import ExportError
    try:
        require_hls4ml()
    except ImportError as e:
        raise SystemExit(f"fxcompile: {e}") from None
    model, x, policy, recorded = _trained_model(args)
    qmodel = _compile_for_deployment(model, policy, x, recorded, args)
    _, layers = hls_plan(qmodel, (x,))
    try:
        reuse_factor = deployed_reuse_factor(qmodel, args.reuse_factor)
    except ExportError as e:
        raise SystemExit(f"fxcompile hls4ml: --reuse-factor: {e}") from None
    hls_model = to_hls4ml(qmodel, args.output_dir, example_inputs=(x,), backend=args.backend, part=args.part,
                          reuse_factor=reuse_factor)
    print(f"wrote hls4ml project {args.output_dir} ({args.backend}, io_parallel, reuse factor {reuse_factor}):")
    for layer in layers:
        print(f"  {layer.name:<10} {layer.kind:<10} " + ", ".join(f"{k} {v}" for k, v in layer.precision.items()))
    if args.compile:
        hls_model.compile()
        print("built the C simulation: hls_model.predict(x) gives the integer graph's outputs")


# ---- doctor ---------------------------------------------------------------------------------

def add_doctor(sub):
    p = sub.add_parser("doctor", help="report the cast kernel, library versions, threads and data root; "
                       "--build builds the kernel ahead of time")
    p.add_argument("--build", action="store_true", help="build (or load) the C++ cast kernel now, so that the "
                   "first training run does not wait for it")
    p.add_argument("--data", help="Fashion-MNIST root to check (default: $FXCOMPILE_DATA)")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_doctor(args):
    """Print one line per fact; exit status 1 when the kernel failed to build."""
    import os
    import platform
    from .experiments.data import DataError, find_root
    from .runtime import kernels
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {'available' if torch.cuda.is_available() else 'not available'})")
    for package in ("torchvision", "onnx", "onnxruntime", "hls4ml", "tensorboard", "timm"):
        print(f"{package:<13}{_version(package)}")
    print(f"threads      torch {torch.get_num_threads()} of {os.cpu_count()} CPUs"
          + "".join(f", {v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ))
    root = args.data or os.environ.get("FXCOMPILE_DATA")
    try:
        print(f"data root    {find_root(root)} (Fashion-MNIST found"
              + (f" via {'--data' if args.data else 'FXCOMPILE_DATA'})" if root else ")"))
    except DataError as e:
        print(f"data root    not usable: {e}")
    if os.environ.get("FXCOMPILE_KERNELS", "").lower() == "python":
        print("kernel       fallback: pure-PyTorch cast, forced by FXCOMPILE_KERNELS=python")
        return 0
    where = kernels.build_directory()
    if not args.build and kernels.backend() is None:
        state = "built" if kernels.is_cached() else "not built yet (fxcompile doctor --build builds it, about a minute)"
        print(f"kernel       {state}; cache {where}")
        return 0
    backend = kernels.load()
    if backend == "cpp":
        print(f"kernel       built: C++ cast kernel loaded from {where}")
        return 0
    print("kernel       build error; fallback: pure-PyTorch cast (training works, slower). The compiler said:")
    for line in kernels.compiler_message(kernels.build_error() or "").splitlines():
        print(f"               {line}")
    print("             fix: install a C++ compiler (g++; on Debian/Ubuntu apt-get install g++) and ninja, "
          f"then run fxcompile doctor --build (cache {where})")
    return 1


COMMANDS = ("demo", "train", "inspect", "sweep", "report", "export", "run-onnx", "hls4ml", "doctor")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fxcompile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        globals()[f"add_{name.replace('-', '_')}"](sub)
    args = parser.parse_args(argv)
    from .errors import FxcompileError
    try:
        return globals()[f"run_{args.command.replace('-', '_')}"](args)
    except FxcompileError as e:  # bad input: one line naming what is at fault, no traceback
        raise SystemExit(f"fxcompile: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
