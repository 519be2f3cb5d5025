"""torchvision CNNs trained on Fashion-MNIST under ``baseline``, deployed as integer ONNX graphs.

Each model (torchvision's, 10 classes, its first convolution rebuilt for one channel) is
trained under the ``baseline`` policy (Adam, lr 0.001, batch 32) for ``--epochs`` epochs on the
60,000 training images, then exported as the integer ONNX graph and run by ONNX Runtime on the
full 10,000-image test set.  It prints the simulation's and ORT's accuracy, the output codes
where ORT differs from the integer reference and where the simulation differs from it.  Each
trained model's state is written to ``<out>/<model>.pt`` as soon as its training ends, and its
record to ``<out>/<model>.json`` (and its ``.onnx``) after the check; models whose record is on
disk are skipped and a saved state is loaded instead of trained, so an interrupted run resumes,
and ``--recheck`` exports and checks the saved states again (after a change to the export)::

    python examples/deploy_trained.py --data ../shared/data/fashion-mnist \\
        --models resnet18 mobilenet_v3_small efficientnet_b0 --out runs/deploy_trained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fxcompile as fxc
from fxcompile.deploy.export import export_onnx, verify
from fxcompile.experiments.data import fashion_mnist
from fxcompile.experiments.models import build
from fxcompile.training.batch_norms import tracked_batch_norms
from fxcompile.training.train import TrainConfig, train, write_metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST root (default: $FXCOMPILE_DATA)")
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
    p.add_argument("--policy", default="baseline")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default="runs/deploy_trained")
    p.add_argument("--recheck", action="store_true", help="export and check the saved trained states again")
    p.add_argument("--recalibrate", type=int, default=0, metavar="N",
                   help="before export, recompute the batch norms' running statistics from N training images "
                        "(fxc.recalibrate_batch_norms; the weights stay as trained)")
    p.add_argument("--results", default=None, help="also write every model's record to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_data, test_data = fashion_mnist(args.data, train_subset=args.train_subset)
    vx, vy = test_data
    records = {}
    print(f"{'model':<22}{'simulation':>12}{'ORT':>9}{'ORT vs integer':>16}{'simulation vs integer':>23}")
    for name in args.models:
        path, state = out / f"{name}.json", out / f"{name}.pt"
        if path.exists() and not args.recheck:
            rec = json.loads(path.read_text())
        else:
            torch.manual_seed(args.seed)
            model = build(name, num_classes=10, in_channels=1)
            if state.exists():   # trained before: the same compile, then the saved parameters and statistics
                saved = torch.load(state, weights_only=True)
                run = saved.pop("run")
                q = fxc.compile(model, fxc.Policy.coerce(args.policy), loss_fn=torch.nn.CrossEntropyLoss(),
                                example_inputs=(vx[:2],))
                q.load_state_dict(saved["state"])
            else:
                run = train(TrainConfig(model=model, policy=args.policy, epochs=args.epochs, seed=args.seed),
                            train_data, test_data)
                q = run.pop("model_object")
                out.mkdir(parents=True, exist_ok=True)
                torch.save({"state": q.state_dict(), "run": run}, state)
            if args.recalibrate and tracked_batch_norms(q):
                tx = train_data[0]
                order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(args.seed))[:args.recalibrate]
                fxc.recalibrate_batch_norms(q, (tx[order[i:i + 32]] for i in range(0, len(order), 32)))
                run = dict(run, recalibrated_images=args.recalibrate)
            onnx_path = out / f"{name}.onnx"
            export_onnx(q, onnx_path, (vx[:2],))
            r = verify(q, onnx_path, vx, vy)
            rec = dict(run, model=name, ort_accuracy=r["ort_accuracy"], integer_accuracy=r["integer_accuracy"],
                       simulation_eval_accuracy=r["simulation_accuracy"], ort_vs_integer=r["mismatches"],
                       simulation_vs_integer=r["simulation_mismatches"], output_codes=r["outputs"],
                       top1_agreement=r["top1_agreement"])
            write_metrics(rec, path)
        records[name] = rec
        print(f"{name:<22}{100 * rec['simulation_eval_accuracy']:>11.2f}%{100 * rec['ort_accuracy']:>8.2f}%"
              f"{rec['ort_vs_integer']:>16}{rec['simulation_vs_integer']:>23}  (of {rec['output_codes']} codes)",
              flush=True)
    if args.results:
        write_metrics({"command": "python examples/deploy_trained.py " + " ".join(argv or sys.argv[1:]),
                       "date": time.strftime("%Y-%m-%d"), "models": records}, Path(args.results))


if __name__ == "__main__":
    main()
