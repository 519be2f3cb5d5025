"""Own models and images from the command line: image folders, model names, auto:K, export."""

import json
import re

import pytest
import torch
from torch import nn

from fxcompile.cli import main
from fxcompile.experiments.data import DataError, image_folder
from fxcompile.experiments.models import build

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_folder(root, per_class=10, size=(16, 12), seed=0):
    """A folder of PNGs, one subfolder per class: the class colour plus noise."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(-40, 41, (size[1], size[0], 3), generator=g)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class TinyCNN(nn.Module):
    """Two conv/ReLU/max-pool blocks for 3x16x16 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def test_a_single_folder_is_split_per_class_the_same_way_every_time(tmp_path):
    make_folder(tmp_path / "imgs")
    (tx, ty), (vx, vy), info = image_folder(tmp_path / "imgs", image_size=16, test_fraction=0.2)
    assert info["classes"] == ["blue", "green", "red"] and info["channels"] == 3
    assert tx.shape == (24, 3, 16, 16) and vx.shape == (6, 3, 16, 16)
    assert torch.bincount(vy).tolist() == [2, 2, 2]
    # normalised with the training images' own per-channel statistics
    assert torch.allclose(tx.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(tx.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    (tx2, _), (vx2, vy2), _ = image_folder(tmp_path / "imgs", image_size=16, test_fraction=0.2)
    assert torch.equal(vx, vx2) and torch.equal(vy, vy2) and torch.equal(tx, tx2)


def test_train_and_test_folders_given_normalisation_resize_and_grayscale(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=4)
    make_folder(tmp_path / "d" / "val", per_class=2, seed=1)
    (tx, ty), (vx, vy), info = image_folder(tmp_path / "d", image_size=8, mean=[0.5], std=[0.25], grayscale=True)
    assert tx.shape == (12, 1, 8, 8) and vx.shape == (6, 1, 8, 8)
    assert info["split"] == "folders" and info["mean"] == [0.5] and info["std"] == [0.25]
    assert float(tx.min()) >= -2.0 and float(tx.max()) <= 2.0   # (x - 0.5) / 0.25 with x in [0, 1]
    (tx, _), _, info = image_folder(tmp_path / "d")    # the first image's size: 12 rows x 16 columns
    assert tx.shape[2:] == (12, 16) and info["image_size"] == [12, 16]


def test_a_broken_image_or_missing_folder_is_named(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "red" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        image_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match="nowhere"):
        image_folder(tmp_path / "nowhere")


def test_models_by_torchvision_name_timm_name_and_module_callable():
    assert build("resnet18", num_classes=3).fc.out_features == 3
    assert build("torchvision:mobilenet_v3_small", num_classes=5).classifier[-1].out_features == 5
    assert build("tests.experiments.test_imagefolder:TinyCNN", num_classes=4).fc.out_features == 4
    with pytest.raises(ValueError, match="unknown model 'no_such_net'"):
        build("no_such_net")
    with pytest.raises(ValueError, match="3-channel images"):
        build("tests.experiments.test_imagefolder:TinyCNN", in_channels=1)  # the user's own model is not rebuilt


@pytest.mark.parametrize("name, first", [("resnet18", "conv1"), ("mobilenet_v3_small", "features.0.0")])
def test_torchvision_models_get_a_first_convolution_for_the_data_channels(name, first):
    m = build(name, num_classes=3, in_channels=1)
    conv = m.get_submodule(first)
    assert (conv.in_channels, conv.out_channels) == (1, build(name).get_submodule(first).out_channels)
    assert m.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def test_timm_models_by_name():
    pytest.importorskip("timm", reason="timm is an optional extra (pip install 'fxcompile[timm]')")
    m = build("timm:resnet10t", num_classes=3, in_channels=1)
    assert m.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def _accuracy(text, pattern):
    return float(re.search(pattern, text).group(1))


@pytest.mark.parametrize("policy", ["baseline", "auto:2"])
def test_train_export_and_run_onnx_on_an_image_folder(tmp_path, capsys, policy):
    make_folder(tmp_path / "imgs", per_class=10)
    data = ["--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "16"]
    main(["train", "--model", "tests.experiments.test_imagefolder:TinyCNN", *data, "--policy", policy,
          "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--save", str(tmp_path / "run.pt")])
    trained = _accuracy(capsys.readouterr().out, r"test accuracy ([\d.]+)%")
    main(["export", str(tmp_path / "m.onnx"), "--state-dict", str(tmp_path / "run.pt")])
    assert "integer ops" in capsys.readouterr().out
    main(["run-onnx", str(tmp_path / "m.onnx"), *data])
    out = capsys.readouterr().out
    assert "on 6 test images" in out
    # the integer graph classifies the held-out images as the fixed-point simulation did
    assert _accuracy(out, r"accuracy ([\d.]+)%") == trained
    if policy.startswith("auto"):   # export chose the formats again and checked them against training's
        saved = torch.load(tmp_path / "run.pt", weights_only=True)
        edges = json.loads(saved["fxcompile"]["assignment"])
        edges[-1]["forward"] = "16.1"
        saved["fxcompile"]["assignment"] = json.dumps(edges)
        torch.save(saved, tmp_path / "tampered.pt")
        with pytest.raises(SystemExit, match="different formats on 1 edge"):
            main(["export", str(tmp_path / "m2.onnx"), "--state-dict", str(tmp_path / "tampered.pt")])


def test_auto_k_must_be_a_number_and_unknown_models_are_named(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(SystemExit, match="auto:K"):
        main(["train", "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--policy", "auto:x"])
    with pytest.raises(SystemExit, match="no_such_net"):
        main(["train", "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--model", "no_such_net"])
