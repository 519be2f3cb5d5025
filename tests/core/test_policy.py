"""Policy: role fallback, overrides, errors, files, and the shipped policies."""
import json
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompile as fxc
from fxcompile import FormatError, Policy, PolicyError, fixed, load_policy
from fxcompile.experiments.models import SeedCNN
from fxcompile.core.policy import ROLES

POLICIES = Path(fxc.__file__).parent / "core" / "policies"


def test_role_fallback():
    p = Policy(activation="16.8", gradient="16.10", loss="16.11", weight="24.12", bias="16.8")
    assert p.format_for("activation_in") == p.format_for("activation_out") == fixed(16, 8)
    assert p.format_for("input") == fixed(16, 8)
    assert p.format_for("weight_gradient") == p.format_for("bias_gradient") == fixed(16, 10)
    assert p.format_for("loss") == fixed(16, 11)
    finer = Policy(activation="16.8", activation_in="12.6", input="8.7", gradient="16.10", weight_gradient="20.14")
    assert finer.format_for("activation_in") == fixed(12, 6)
    assert finer.format_for("activation_out") == fixed(16, 8)
    assert finer.format_for("input") == fixed(8, 7)
    assert finer.format_for("weight_gradient") == fixed(20, 14)
    assert finer.format_for("bias_gradient") == fixed(16, 10)
    assert finer.format_for("weight") is None  # unset: stays float
    assert Policy(activation=None, activation_out="16.8").format_for("activation_in") is None


def test_overrides_by_pattern_and_op_later_wins():
    p = Policy(activation="16.8", weight="24.12", overrides=[
        {"pattern": "fc*", "weight": "16.11"},
        {"op": "Linear", "weight": "12.10"},
        {"pattern": "fc2", "op": "linear", "weight": "8.6"},
        {"pattern": "conv?.weight", "weight": "float"},
    ])
    assert p.format_for("weight", ["fc1_weight", "fc1.weight", "fc1"], "get_attr") == fixed(16, 11)
    assert p.format_for("weight", ["fc1"], "Linear") == fixed(12, 10)
    assert p.format_for("weight", ["fc2"], "Linear") == fixed(8, 6)  # op matching ignores case
    assert p.format_for("weight", ["conv1.weight"], None) is None
    assert p.format_for("weight", ["conv1"], "Conv2d") == fixed(24, 12)
    assert p.format_for("activation", ["fc1"], "Linear") == fixed(16, 8)


def test_overrides_reach_the_compiled_edges():
    p = Policy(activation="16.8", gradient="16.10", weight="24.12", bias="16.8", loss="16.10",
               overrides=[{"pattern": "fc*", "weight": "16.11"}, {"op": "Conv2d", "activation_in": "12.4"}])
    q = fxc.compile(SeedCNN(), p, example_inputs=(torch.randn(1, 1, 28, 28),))
    edges = {e.name: e for e in fxc.assignment(q)}
    assert edges["fc1_weight->*"].forward == fixed(16, 11)
    assert edges["conv1_weight->*"].forward == fixed(24, 12)
    assert edges["pool1->conv2"].forward == fixed(12, 4)
    assert edges["pool1->*"].forward == fixed(16, 8)


@pytest.mark.parametrize("kwargs, name", [
    (dict(activations="16.8"), "activations"),
    (dict(overrides=[{"pattern": "fc*", "wieght": "16.8"}]), "wieght"),
])
def test_unknown_role_raises_naming_it(kwargs, name):
    with pytest.raises(PolicyError, match=name):
        Policy(**kwargs)


def test_other_policy_errors():
    with pytest.raises(PolicyError, match="activation_inn"):
        Policy().format_for("activation_inn")
    with pytest.raises(PolicyError, match="pattern"):
        Policy(overrides=[{"weight": "16.8"}])
    with pytest.raises(FormatError, match="weight"):
        Policy(weight="40.8")
    with pytest.raises(PolicyError, match="colour"):
        Policy.from_dict({"colour": "red"})
    with pytest.raises(PolicyError, match="clip_gradient"):
        Policy.from_dict({"clip_gradient": "no"})
    with pytest.raises(PolicyError, match="overrides"):
        Policy.from_dict({"overrides": ["fc*"]})
    with pytest.raises(PolicyError, match="nosuch"):
        load_policy("nosuch.toml")


def test_override_matching_nothing_warns_and_matching_ones_do_not():
    x = torch.randn(1, 1, 28, 28)
    p = Policy(activation="16.8", overrides=[{"pattern": "decoder.*", "activation": "8.4"}])
    with pytest.warns(UserWarning, match="decoder"):
        fxc.compile(SeedCNN(), p, example_inputs=(x,))
    used = Policy(activation="16.8", overrides=[{"pattern": "fc1", "activation": "8.4"},
                                                {"op": "CrossEntropyLoss", "loss": "16.12"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = fxc.compile(SeedCNN(), used, loss_fn=nn.CrossEntropyLoss(), example_inputs=(x,))
    edges = {e.name: e for e in fxc.assignment(q)}
    assert edges["fc1->*"].forward == fixed(8, 4)
    assert edges["loss.loss_fn->*"].forward == fixed(16, 12)


def _rich_policy():
    return Policy(name="rich", clip_gradient=False, prediction_gradient="inward", activation="16.8", input="u8.8", gradient="16.10,stochastic",
                  loss="16.10", weight="24.12", bias="16.8,floor", weight_gradient=None,
                  overrides=[{"pattern": "fc*", "weight": "16.11,wrap", "activation_in": "12.6,zp=3"},
                             {"op": "Conv2d", "bias": "float"}, {"pattern": "conv1", "op": "Conv2d", "gradient": "8.4"}])


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    p = _rich_policy()
    path = tmp_path / f"policy{suffix}"
    p.save(path)
    q = load_policy(path)
    assert q == p
    assert q.format_for("activation_in", ["fc1"], "Linear") == fixed(12, 6, zero_point=3)
    assert q.format_for("bias", ["conv2"], "Conv2d") is None
    assert q.format_for("gradient", ["conv1"], "Conv2d") == fixed(8, 4)
    assert q.format_for("weight_gradient") is None
    assert not q.clip_gradient and q.name == "rich" and q.prediction_gradient == "inward"
    data = tomllib.loads(path.read_text()) if suffix == ".toml" else json.loads(path.read_text())
    assert data["formats"]["input"] == "u8.8"  # written with its standard parser's syntax
    assert Policy.coerce(str(path)) == p and Policy.coerce(p.to_dict()) == p


def test_save_rejects_unknown_suffix(tmp_path):
    with pytest.raises(PolicyError, match="toml"):
        Policy().save(tmp_path / "p.yaml")


BAD_TOML = '''name = "bad"
clip_gradient = true

[formats]
weight_gradient = "16.10"
activation = "16.8"
weight = "24.12"   # the first weight key
bias = "16.8"

[[overrides]]
pattern = "fc*"
weight = "16.11"

[[overrides]]
op = "Conv2d"
weight = "40.8"
'''


def _error(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises((PolicyError, FormatError)) as info:
        load_policy(path)
    return str(info.value), path


@pytest.mark.parametrize("old, new, key, line", [
    ('weight = "40.8"', 'weight = "40.8"', "overrides[1].weight", 16),
    ('weight = "24.12"   #', 'weight = "24.x"   #', "formats.weight", 7),
    ('bias = "16.8"', 'bias = "16.8,sideways"', "formats.bias", 8),
    ('activation = "16.8"', 'activaton = "16.8"', "activaton", 6),
    ('pattern = "fc*"\nweight = "16.11"', 'pattern = "fc*"\nweigth = "16.11"', "weigth", 12),
    ('clip_gradient = true', 'clip_gradient = "yes"', "clip_gradient", 2),
    ('clip_gradient = true', 'clip_gradient = true\nprediction_gradient = "outward"', "prediction_gradient", 3),
    ('op = "Conv2d"\n', '', "overrides[1]", 14),
])
def test_bad_toml_value_names_file_key_and_line(tmp_path, old, new, key, line):
    text = BAD_TOML.replace(old, new) if old != new else BAD_TOML
    if old != 'weight = "40.8"':
        text = text.replace('weight = "40.8"', 'weight = "16.8"')
    msg, path = _error(tmp_path, text)
    assert str(path) in msg
    assert key in msg
    assert f"(line {line})" in msg
    assert text.splitlines()[line - 1].strip()  # the line is the offending one, not a blank


def test_bad_value_in_dotted_and_inline_toml(tmp_path):
    msg, _ = _error(tmp_path, 'name = "x"\nformats.activation = "16.8"\nformats.weight = "99.1"\n')
    assert "formats.weight" in msg and "(line 3)" in msg
    msg, _ = _error(tmp_path, '[formats]\nweight = "16.8"\noverrides = 3\n')
    assert "overrides" in msg and "(line 3)" in msg
    msg, _ = _error(tmp_path, '[formats]\nweight = "16.8"\n[[overrides]]\npattern = "a"\n\n'
                              '[formats.extra]\n')
    assert "extra" in msg
    msg, _ = _error(tmp_path, 'name = "x"\noverrides = [{pattern = "a", weight = "77.1"}]\n')
    assert "overrides[0].weight" in msg and "(line 2)" in msg


def test_invalid_toml_and_json_syntax(tmp_path):
    msg, path = _error(tmp_path, '[formats\nweight = "16.8"\n')
    assert str(path) in msg and "line 1" in msg
    msg, path = _error(tmp_path, '{"formats": {"weight": "16.8",}}', name="p.json")
    assert str(path) in msg and "line 1" in msg
    msg, path = _error(tmp_path, '{"formats": {"weight": "16.99"}}', name="p.json")
    assert str(path) in msg and "formats.weight" in msg


@pytest.mark.parametrize("name", ["baseline", "optimized"])
def test_shipped_policies_equal_their_files(name):
    from_file = Policy.from_dict(tomllib.loads((POLICIES / f"{name}.toml").read_text()))
    shipped = getattr(fxc, name)()
    assert shipped == from_file
    assert load_policy(name) == shipped == load_policy(POLICIES / f"{name}.toml")


def test_shipped_8bit_policy_equals_its_file():
    from_file = Policy.from_dict(tomllib.loads((POLICIES / "8bit.toml").read_text()))
    assert load_policy("8bit") == from_file == load_policy(POLICIES / "8bit.toml")
    p = load_policy("8bit")
    assert p.name == "8bit"
    assert [str(p.format_for(r)) for r in ("input", "activation", "weight")] == ["u8.7", "8.3", "8.6,stochastic"]


def test_study_formats_and_fp32():
    b, o = fxc.baseline(), fxc.optimized()
    assert [(f.bits, f.frac) for f in (b.format_for(r) for r in ("activation", "gradient", "loss", "weight", "bias"))] \
        == [(16, 8), (16, 10), (16, 10), (24, 12), (16, 8)]
    assert [(f.bits, f.frac) for f in (o.format_for(r) for r in ("activation", "gradient", "loss", "weight", "bias"))] \
        == [(16, 4), (16, 9), (16, 11), (16, 11), (10, 8)]
    assert all(fxc.fp32().format_for(r) is None for r in ROLES)
