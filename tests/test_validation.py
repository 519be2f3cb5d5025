"""Bad input gets an error (or warning) that names the field, key, file, line, module and op."""

import warnings

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile import cli
from fxcompile.errors import FormatError, PolicyError, TraceError


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=0, frac=0), "bits"), (dict(bits=33, frac=8), "bits"), (dict(bits=1, frac=0), "bits"),
    (dict(bits=16, frac=65), "frac"), (dict(bits=16, frac=-65), "frac"), (dict(bits=16.0, frac=8), "bits"),
    (dict(bits=16, frac=8, rounding="up"), "rounding"), (dict(bits=16, frac=8, overflow="clip"), "overflow"),
    (dict(bits=16, frac=8, mode="affine"), "mode"), (dict(bits=8, frac=0, zero_point=300), "zero_point"),
    (dict(bits=8, frac=0, signed=False, narrow=True), "narrow"),
])
def test_invalid_formats_name_the_field(kwargs, field):
    with pytest.raises(FormatError, match=rf"FixedPoint\.{field}"):
        fxc.FixedPoint(**kwargs)
    assert issubclass(FormatError, ValueError)


def test_policy_unknown_role_and_key():
    with pytest.raises(PolicyError, match="unknown role 'activations'"):
        fxc.Policy(activations="16.8")
    with pytest.raises(PolicyError, match="overrides\\[0\\].*unknown role 'wieght'"):
        fxc.Policy(overrides=[{"pattern": "fc*", "wieght": "16.8"}])
    with pytest.raises(PolicyError, match="colour"):
        fxc.Policy.from_dict({"colour": 3})


def test_conflicting_overrides_warn_naming_both():
    with pytest.warns(UserWarning, match=r"overrides\[0\] and overrides\[2\].*'weight', to 16.8 and 12.4"):
        fxc.Policy(overrides=[{"pattern": "fc*", "weight": "16.8"}, {"op": "linear", "weight": "8.4"},
                              {"pattern": "fc*", "weight": "12.4"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same format twice, or other targets: no conflict
        fxc.Policy(overrides=[{"pattern": "fc*", "weight": "16.8"}, {"pattern": "fc*", "weight": "16.8"},
                              {"pattern": "conv*", "weight": "12.4"}])


def test_override_matching_nothing_warns():
    policy = fxc.Policy(activation="16.8", overrides=[{"pattern": "nosuchlayer*", "weight": "8.4"}])
    with pytest.warns(UserWarning, match="nosuchlayer"):
        fxc.compile(nn.Sequential(nn.Linear(2, 2)), policy, example_inputs=(torch.zeros(1, 2),))


def test_policy_file_errors_name_file_key_and_line(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('name = "x"\n\n[formats]\nactivation = "16.8"\ngradient = "40.10"\n')
    with pytest.raises(FormatError, match=r"p\.toml.*gradient.*bits.*\(line 5\)"):
        fxc.load_policy(f)
    f.write_text('[formats]\nactivation = "16.8"\n\n[[overrides]]\npattern = "fc*"\nweight = "16.8,fancy"\n')
    with pytest.raises(FormatError, match=r"p\.toml.*overrides\[0\]\.weight.*fancy.*\(line 6\)"):
        fxc.load_policy(f)
    f.write_text("[formats]\nactivation = 16.8.1\n")
    with pytest.raises(PolicyError, match=r"p\.toml.*line 2"):
        fxc.load_policy(f)
    j = tmp_path / "p.json"
    j.write_text('{"formats": {"activation": "16.8",}}')
    with pytest.raises(PolicyError, match=r"p\.json.*line 1"):
        fxc.load_policy(j)


def test_cli_rejects_bad_arguments(tmp_path, monkeypatch):
    from fxcompile.experiments.data import synthetic
    monkeypatch.setattr(cli, "_load_dataset", lambda args: (*synthetic(n_train=16, n_test=8), {"classes": [str(i) for i in range(10)], "channels": 1}))
    bad = tmp_path / "bad.toml"
    bad.write_text('[formats]\nweigth = "16.8"\n')
    with pytest.raises(SystemExit, match=r"bad\.toml.*weigth.*line 2"):
        cli.main(["train", "--policy", str(bad), "--epochs", "1"])
    with pytest.raises(SystemExit, match="checkpoint-every"):
        cli.main(["train", "--checkpoint-every", "0", "--checkpoint-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "two"])  # argparse names the argument


class _Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 4)

    def forward(self, x):
        if self.kind == "if":
            return self.fc(x) if x.sum() > 0 else x
        if self.kind == "len":
            return self.fc(x) * len(x)
        if self.kind == "iter":
            return torch.stack([row for row in x])
        if self.kind == "int":
            return x.view(int(x.shape[0]), -1)
        if self.kind == "range":
            return torch.stack([x[i] for i in range(x.size(0))])
        if self.kind == "numpy":
            return torch.from_numpy(x.detach().numpy())
        raise AssertionError(self.kind)


class _Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), _Block(kind))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind, failure", [
    ("if", "data-dependent control flow"), ("len", "len()"), ("iter", "iteration over a traced tensor"),
    ("int", "dynamic shape used as a Python number"), ("range", "traced size used as a Python int"),
    ("numpy", "passed to NumPy"),
])
def test_trace_errors_name_module_operation_and_fix(kind, failure):
    x = torch.randn(2, 4)
    with pytest.raises(TraceError) as info:
        fxc.compile(_Net(kind), "baseline", example_inputs=(x,), frontend="fx")
    msg = str(info.value)
    assert "module 'body.1' (_Block)" in msg and failure in msg
    assert "test_validation.py" in msg  # the offending line
    assert "leaf_modules=['body.1']" in msg
    # the suggested fix works: the block becomes a leaf, quantized at its boundary
    q = fxc.compile(_Net(kind), "baseline", example_inputs=(x,), leaf_modules=["body.1"])
    assert torch.isfinite(q(x)).all()
