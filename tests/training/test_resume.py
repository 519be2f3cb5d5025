"""No lost work: a run killed with SIGKILL at a chosen step and resumed starts from its newest
checkpoint, runs only the steps after it, and ends bit-identical to an uninterrupted run; the
same seed gives the same parameters and metrics (stochastic rounding included)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import fxcompile as fxc
from fxcompile.training.checkpoint import checkpoints
from fxcompile.experiments.data import synthetic
from fxcompile.training.train import TrainConfig, train

N_TRAIN, BATCH, EPOCHS = 160, 16, 2   # 10 steps an epoch
TOTAL_STEPS = EPOCHS * N_TRAIN // BATCH

# The training process under test.  With a kill step N it SIGKILLs itself when the loss of
# step N + 1 is asked for: N steps have run (counted here, not by fxcompile) and step N + 1
# is under way, so the kill lands at a chosen point, not whenever a checkpoint appears.
SCRIPT = textwrap.dedent(f"""
    import json, os, signal, sys, torch
    torch.set_num_threads(1)
    import fxcompile as fxc
    import fxcompile.training.train as training
    from fxcompile.experiments.data import synthetic
    from fxcompile.training.train import TrainConfig, train
    ckdir, out, resume, every, kill_after = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
    build, calls = training._build, []

    def counting_build(*args, **kwargs):
        model, loss_fn, opt = build(*args, **kwargs)

        def loss(prediction, target):
            if len(calls) == kill_after:
                with open(out + ".steps", "w") as f:
                    f.write(str(len(calls)))
                os.kill(os.getpid(), signal.SIGKILL)
            calls.append(1)
            return loss_fn(prediction, target)
        return model, loss, opt

    training._build = counting_build
    tr, te = synthetic(n_train={N_TRAIN}, n_test=32)
    cfg = TrainConfig(model="mlp", policy=fxc.baseline(), epochs={EPOCHS}, batch_size={BATCH},
                      checkpoint_every=every, progress=False)
    m = train(cfg, tr, te, checkpoint_dir=ckdir, resume=resume)
    torch.save(m["model_object"].state_dict(), out)
    with open(out + ".json", "w") as f:
        json.dump({{"history": m["history"], "start_step": m["start_step"], "steps_run": m["steps_run"],
                    "losses_computed": len(calls)}}, f)
""")


def _config(seed=0, epochs=EPOCHS):
    return TrainConfig(model="mlp", policy=fxc.baseline(), epochs=epochs, batch_size=BATCH, seed=seed,
                       progress=False)


def _reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run one thread too
    try:
        return train(_config(), *synthetic(n_train=N_TRAIN, n_test=32))
    finally:
        torch.set_num_threads(threads)


def _assert_same_parameters(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _step_of(path) -> int:
    return int(path.stem.split("-")[1])


def test_sigkill_mid_epoch_then_resume_skips_the_finished_steps(tmp_path):
    _kill_and_resume(tmp_path, kill_after=7, every=1)   # step 8 of epoch 1 (10 steps) under way


@pytest.mark.slow
@pytest.mark.parametrize("kill_after, every", [(1, 1), (9, 1), (10, 1), (11, 1), (17, 1), (8, 3), (14, 4)])
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, kill_after, every):
    _kill_and_resume(tmp_path, kill_after, every)


def _kill_and_resume(tmp_path, kill_after, every):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ckdir, out = tmp_path / "ckpt", tmp_path / "final.pt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = [sys.executable, str(script), str(ckdir), str(out)]
    killed = subprocess.run(run + ["0", str(every), str(kill_after)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    assert int((tmp_path / "final.pt.steps").read_text()) == kill_after   # steps the killed process ran
    # the newest checkpoint is the last multiple of `every` (or an epoch end) at or before the kill
    steps_per_epoch = N_TRAIN // BATCH
    saved = max(s for s in range(kill_after + 1) if s % every == 0 or s % steps_per_epoch == 0)
    assert _step_of(checkpoints(ckdir)[-1]) == saved

    done = subprocess.run(run + ["1", str(every), "-1"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((tmp_path / "final.pt.json").read_text())
    # the resumed process started from the checkpoint and ran only the steps after it ...
    assert resumed["start_step"] == saved
    assert resumed["steps_run"] == resumed["losses_computed"]
    # ... so the two processes together ran one uninterrupted run's steps, plus those the
    # killed one ran after its last checkpoint (none when it checkpoints every step)
    assert kill_after + resumed["steps_run"] == TOTAL_STEPS + (kill_after - saved)

    ref = _reference()
    assert (ref["start_step"], ref["steps_run"]) == (0, TOTAL_STEPS)
    _assert_same_parameters(ref["model_object"].state_dict(), torch.load(out, weights_only=True))
    assert resumed["history"] == ref["history"]


def test_same_seed_same_parameters_and_metrics():
    data = synthetic(n_train=64, n_test=32)
    runs = [train(_config(seed=s, epochs=1), *data) for s in (3, 3, 4)]
    a, b, c = (r["model_object"].state_dict() for r in runs)
    _assert_same_parameters(a, b)
    assert runs[0]["history"] == runs[1]["history"]
    # the oracle can fail: another seed gives other parameters
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_stochastic_rounding_depends_only_on_the_restored_global_rng():
    # Stochastic rounding draws from the global generator: restoring its state repeats the
    # rounding exactly, which is what resuming relies on.
    x = torch.randn(1000) * 1e-3
    fmt = fxc.fixed(16, 10, rounding="stochastic")
    state = torch.get_rng_state()
    first = fmt.quantize(x)
    torch.set_rng_state(state)
    assert torch.equal(fmt.quantize(x), first)
    assert not torch.equal(fmt.quantize(x), first)
