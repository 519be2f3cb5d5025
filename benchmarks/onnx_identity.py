"""Are the exported ONNX files byte-identical to those of another git revision?

Exports the seed CNN (``baseline`` and ``optimized``), the MLP and the residual CNN, each
after three seeded training steps on synthetic data, in every flavour, once with this
working tree and once with the package as of git revision ``REV`` (extracted with
``git archive`` into a temporary folder), each in a fresh process through the public API
only, and compares the files byte for byte::

    python benchmarks/onnx_identity.py --against cdb18bc

Prints one line a file and exits 1 if any differs.  A refactoring that changes structure,
not behaviour, must print ``identical`` everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = [("seed_cnn", "baseline"), ("seed_cnn", "optimized"), ("mlp", "baseline"), ("residual_cnn", "baseline")]
FLAVOURS = ("integer", "qdq", "qonnx")

# Runs in the child process, against whichever fxcompile is first on sys.path.
_EXPORT = r"""
import sys, torch
import fxcompile as fxc
try:
    from fxcompile.experiments.models import build
except ImportError:  # revisions before the package layout of core/ frontend/ ... experiments/
    from fxcompile.models import build
out, cases, flavours = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
for case in cases:
    name, policy = case.split(":")
    torch.manual_seed(0)
    model = build(name)
    qmodel = fxc.compile(model, getattr(fxc, policy)(), loss_fn=torch.nn.CrossEntropyLoss())
    opt = fxc.fixed_point_optimizer(torch.optim.Adam(qmodel.parameters(), 1e-3), qmodel)
    for step in range(3):
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        opt.zero_grad()
        qmodel.loss(qmodel(x), y).backward()
        opt.step()
    qmodel.eval()
    for flavour in flavours:
        fxc.export_onnx(qmodel, f"{out}/{name}_{policy}_{flavour}.onnx", example_inputs=(x[:1],), flavour=flavour)
"""


def export_all(package_parent: pathlib.Path, out: pathlib.Path) -> None:
    """Export every case with the fxcompile package found in ``package_parent``."""
    env = dict(os.environ, PYTHONPATH=str(package_parent), FXCOMPILE_KERNELS="python")
    cases = ",".join(f"{m}:{p}" for m, p in CASES)
    subprocess.run([sys.executable, "-c", _EXPORT, str(out), cases, ",".join(FLAVOURS)], env=env, check=True,
                   cwd=out)


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", metavar="REV", required=True, help="git revision to compare with")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        old_tree, old_out, new_out = tmp / "tree", tmp / "old", tmp / "new"
        for d in (old_tree, old_out, new_out):
            d.mkdir()
        archive = subprocess.run(["git", "archive", args.against, "fxcompile"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        export_all(old_tree, old_out)
        export_all(ROOT, new_out)
        differing = 0
        for model, policy in CASES:
            for flavour in FLAVOURS:
                name = f"{model}_{policy}_{flavour}.onnx"
                old, new = digest(old_out / name), digest(new_out / name)
                same = old == new
                differing += not same
                print(f"{name:<36} {args.against}: {old}  now: {new}  {'identical' if same else 'DIFFERENT'}")
        print(f"{len(CASES) * len(FLAVOURS) - differing} of {len(CASES) * len(FLAVOURS)} files byte-identical")
        return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
