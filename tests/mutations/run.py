"""Mutation check: break the library in five known ways and show that the tests notice.

Each mutation edits one line of a scratch copy of the repository (the tracked files of the
working tree), then runs the tests that claim to catch it there; a mutation that every test
survives is a hole in the suite.  Prints a table of mutation → failing tests and writes it,
with the command and date, as JSON::

    python tests/mutations/run.py                       # all five; each runs only its listed tests
    python tests/mutations/run.py --only fold_bn --out /tmp/m.json

Exit status 1 when a mutation survives or an original line is not found (the code moved:
update the mutation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRATCH = Path(tempfile.gettempdir()) / f"fxcompile-mutants-{os.getuid()}"

# name → (what it breaks, [(file, original text, mutated text)], tests that must catch it)
MUTATIONS = {
    "restore_restarts": (
        "restore ignores the checkpoint and restarts from step 0",
        [("fxcompile/training/checkpoint.py",
          "state = load_latest(self.directory) if self.resume else None",
          "state = None")],
        ["tests/training/test_resume.py::test_sigkill_mid_epoch_then_resume_skips_the_finished_steps"]),
    "float_gradient_edge": (
        "an activation-gradient edge float in metadata and cast (the first activation of each graph)",
        [("fxcompile/passes/assign.py",
          "        value_role, grad_role = edge_roles(role)\n",
          "        value_role, grad_role = edge_roles(role)\n"
          "        first_activation = role == 'activation' and not any(\n"
          "            n.meta.get('fxc_role') == 'activation' for n in gm.graph.nodes if n is not node and\n"
          "            'fxc_value' in n.meta)\n"),
         ("fxcompile/passes/assign.py",
          "grad_role, policy.format_for(grad_role, names, op), op, _shape(node))",
          "grad_role, None if first_activation else policy.format_for(grad_role, names, op), op, _shape(node))")],
        ["tests/test_quantization_points.py"]),
    "weight_floor": (
        "the weight cast rounds with floor instead of nearest",
        [("fxcompile/passes/casts.py",
          "        self._fwd = [] if self.forward_identity else spec_of(fwd)",
          "        if fwd is not None and edge.role == 'weight':\n"
          "            fwd = fwd.replace(rounding='floor')\n"
          "        self._fwd = [] if self.forward_identity else spec_of(fwd)")],
        ["tests/deploy/test_fold_bn.py", "tests/passes/test_casts.py", "tests/test_quantization_points.py"]),
    "float_allreduce": (
        "the all-reduce sums float gradients instead of integer codes",
        [("fxcompile/training/distributed.py",
          "return fmt.to_codes(torch.where(finite, g, 0.0).flatten()), bad",
          "return torch.where(finite, g, 0.0).flatten().double() / fmt.scale, bad"),
         ("fxcompile/training/distributed.py",
          "dtype = torch.int32 if wide <= 30 else torch.int64",
          "dtype = torch.float64")],
        ["tests/training/test_distributed.py"]),
    "fold_bn_off_by_one": (
        "fold_bn stores every folded parameter one code too high",
        [("fxcompile/deploy/fold_bn.py",
          "value = value if fmt is None else _deployable(fmt).quantize(value)",
          "value = value if fmt is None else _deployable(fmt).quantize(value) + fmt.scale")],
        ["tests/deploy/test_fold_bn.py"]),
}


def scratch_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def mutate(root: Path, edits) -> None:
    for rel, old, new in edits:
        path = root / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{rel}: the line to mutate occurs {text.count(old)} times, not once: {old!r}")
        path.write_text(text.replace(old, new))


def run_tests(root: Path, tests) -> tuple[int, list[str], float]:
    # The cast kernel's build records its source path: mutants get their own build folder, so
    # that neither they nor the repository's own test runs rebuild it each time.
    env = dict(os.environ, PYTHONPATH=str(root), TORCH_EXTENSIONS_DIR=str(root.parent / "torch_extensions"))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                          cwd=root, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)))
    return done.returncode, failed, time.monotonic() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(MUTATIONS), help="run these mutations only")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    rows, survived = [], []
    SCRATCH.mkdir(exist_ok=True)
    for name in args.only or MUTATIONS:
        what, edits, tests = MUTATIONS[name]
        root = SCRATCH / "repo"   # one path for every mutant: the kernel builds once
        shutil.rmtree(root, ignore_errors=True)
        scratch_copy(root)
        mutate(root, edits)
        code, failed, seconds = run_tests(root, tests)
        caught = code != 0 and bool(failed)
        rows.append({"mutation": name, "breaks": what, "tests_run": tests, "failing_tests": failed,
                     "caught": caught, "seconds": round(seconds, 1)})
        if not caught:
            survived.append(name)
        print(f"{name}: {'caught by ' + ', '.join(failed) if caught else 'SURVIVED'}", flush=True)
        if args.out:   # after each mutation, so that an interrupted run keeps what it measured
            Path(args.out).write_text(json.dumps({
                "command": "python tests/mutations/run.py" + (" --only " + " ".join(args.only) if args.only else ""),
                "date": datetime.date.today().isoformat(), "results": rows}, indent=2) + "\n")
    print("\n| mutation | failing tests |\n|---|---|")
    for r in rows:
        print(f"| {r['breaks']} | {', '.join(t.split('/')[-1] for t in r['failing_tests']) or 'none: survived'} |")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
