"""Models used by the examples, tests and benchmarks."""

from __future__ import annotations

import importlib
import inspect

from torch import nn

__all__ = ["SeedCNN", "MLP", "ResidualCNN", "build", "MODELS"]


class SeedCNN(nn.Module):
    """The study's FashionMNIST CNN shape: two conv/ReLU/max-pool blocks, two linear layers."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class MLP(nn.Module):
    """Three linear layers on flattened 28x28 images."""

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden // 2, num_classes)

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(self.flatten(x))))))


class ResidualCNN(nn.Module):
    """Conv + batch norm + a residual add: the smallest net with every lowering pattern."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)) + y)
        return self.fc(self.flatten(self.pool(y)))


MODELS = {"seed_cnn": SeedCNN, "mlp": MLP, "residual_cnn": ResidualCNN}


def build(name: str, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """A model by name, untrained, with ``num_classes`` outputs.

    ``name`` is one of the bundled models (``seed_cnn``, ``mlp``, ``residual_cnn``), a
    ``module:callable`` returning an ``nn.Module`` (called with ``num_classes=`` when it takes
    that argument), a torchvision classification model (``resnet18``, ``mobilenet_v3_small``;
    ``torchvision:NAME`` to be explicit), or a timm model (``timm:NAME``, or a plain name
    torchvision does not know; needs ``pip install timm``).  ``in_channels`` is passed to timm
    models, and a torchvision model's first convolution is rebuilt for it (untrained, like the
    rest); for the others it is checked against the first convolution::

        build("resnet18", num_classes=4)                  # torchvision.models.resnet18(num_classes=4)
        build("resnet18", num_classes=10, in_channels=1)  # ... whose first conv takes 1 channel
    """
    if name in MODELS:
        model = MODELS[name](num_classes=num_classes)
    elif name.startswith("timm:"):
        model = _timm(name[5:], num_classes, in_channels)
    elif name.startswith("torchvision:"):
        model = adapt_input_channels(_torchvision(name[12:], num_classes), in_channels)
    elif ":" in name:
        model = _from_callable(name, num_classes)
    elif name in _torchvision_names():
        model = adapt_input_channels(_torchvision(name, num_classes), in_channels)
    else:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is None or not timm.is_model(name):
            raise ValueError(f"unknown model {name!r}: not a bundled model ({', '.join(MODELS)}), not a torchvision "
                             "classification model" + (", not a timm model" if timm else
                                                      " (timm models need pip install timm)")
                             + "; or give module:callable returning an nn.Module")
        model = _timm(name, num_classes, in_channels)
    if in_channels is not None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None and first.in_channels != in_channels:
            raise ValueError(f"model {name!r} takes {first.in_channels}-channel images (its first convolution), the "
                             f"data has {in_channels}: choose a model for {in_channels} channels "
                             "(or --grayscale/colour images to match)")
    return model


def adapt_input_channels(model: nn.Module, in_channels: int | None) -> nn.Module:
    """``model`` with its first ``Conv2d`` rebuilt (same geometry, new untrained weights) to take
    ``in_channels`` channels; ``model`` itself if it already does or ``in_channels`` is ``None``."""
    first = next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if in_channels is None or first is None or first[1].in_channels == in_channels:
        return model
    name, conv = first
    if conv.groups != 1:
        raise ValueError(f"the first convolution {name!r} is grouped ({conv.groups} groups): it cannot be rebuilt "
                         f"for {in_channels} input channels")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _torchvision_names() -> set[str]:
    import torchvision
    return set(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision
    if name not in _torchvision_names():
        raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _timm(name: str, num_classes: int, in_channels: int | None) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model {name!r} is a timm model: pip install timm (or pip install 'fxcompile[timm]')") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels or 3)


def _from_callable(spec: str, num_classes: int) -> nn.Module:
    module, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model {spec!r}: {e}") from None
    if isinstance(obj, nn.Module):
        return obj
    try:
        takes_classes = "num_classes" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        takes_classes = False
    model = obj(num_classes=num_classes) if takes_classes else obj()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model
