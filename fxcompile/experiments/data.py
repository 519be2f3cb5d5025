"""Data sets as in-memory tensors: Fashion-MNIST, a synthetic stand-in, and image folders.

Fashion-MNIST comes through torchvision from a data root flag or ``FXCOMPILE_DATA``; the
root may be torchvision's layout (``<root>/FashionMNIST/raw/*.gz``) or a folder that holds
the four official IDX files directly.  Nothing is ever downloaded.  :func:`image_folder`
reads a user's folder of class subfolders (torchvision's ``ImageFolder``); :func:`load`
resolves the names the command line takes (``fashion_mnist``, ``synthetic``,
``imagefolder:DIR``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import torch

from ..core.files import atomic_write
from ..errors import DataError

__all__ = ["IDX_FILES", "find_root", "fashion_mnist", "synthetic", "image_folder", "load", "DataError"]

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MEAN, STD = 0.2860, 0.3530


def _has_idx(folder: Path) -> bool:
    return all((folder / f).exists() or (folder / f[:-3]).exists() for f in IDX_FILES)


def _complete(raw: Path) -> bool:
    return all((raw / f[:-3]).exists() for f in IDX_FILES)


def _fingerprint(folder: Path) -> str:
    """Identify the source files by path, size and modification time."""
    stamp = [str(folder)]
    for f in IDX_FILES:
        src = folder / f[:-3] if (folder / f[:-3]).exists() else folder / f
        st = src.stat()
        stamp.append(f"{src.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16]


def find_root(root: str | os.PathLike | None = None) -> Path:
    """Resolve the data root into torchvision's layout, or raise DataError saying what to do.

    torchvision reads the decompressed IDX files; when the root holds only the ``.gz``
    files they are decompressed once into ``~/.cache/fxcompile``, in a folder keyed by the
    source files' path, size and time (the root is never written).
    """
    root = root or os.environ.get("FXCOMPILE_DATA")
    if not root:
        raise DataError("no Fashion-MNIST data root: pass --data DIR or set FXCOMPILE_DATA=DIR, where DIR holds "
                        f"the four official IDX files ({', '.join(IDX_FILES)}) or torchvision's FashionMNIST/raw/")
    root = Path(root).expanduser().resolve()
    for folder in (root / "FashionMNIST" / "raw", root):
        if not _has_idx(folder):
            continue
        if _complete(folder) and folder.parent.name == "FashionMNIST":
            return folder.parent.parent
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fxcompile" / "fashion-mnist"
        cache = cache / _fingerprint(folder)  # one copy per source: another root never reads stale files
        raw = cache / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in IDX_FILES:
            target = raw / f[:-3]
            if target.exists():
                continue
            src = folder / f[:-3]
            # runs started together each write a private temporary file, and a killed run
            # never leaves a half file behind
            with atomic_write(target) as fout:
                with (open(src, "rb") if src.exists() else gzip.open(folder / f, "rb")) as fin:
                    shutil.copyfileobj(fin, fout)
        return cache
    missing = [f for f in IDX_FILES if not (root / f).exists()]
    raise DataError(f"{root} does not hold the Fashion-MNIST IDX files (missing: {', '.join(missing)}); "
                    "point --data / FXCOMPILE_DATA at the folder that holds them")


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = dataset.data.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)
    return x, dataset.targets.clone()


def fashion_mnist(root=None, train_subset: int | None = None, test_subset: int | None = None, seed: int = 0):
    """(train_x, train_y), (test_x, test_y) as normalised float tensors (N, 1, 28, 28)."""
    from torchvision.datasets import FashionMNIST
    r = find_root(root)
    train, test = FashionMNIST(r, train=True, download=False), FashionMNIST(r, train=False, download=False)
    (tx, ty), (vx, vy) = _tensors(train), _tensors(test)
    if train_subset:
        idx = torch.randperm(len(tx), generator=torch.Generator().manual_seed(seed))[:train_subset]
        tx, ty = tx[idx], ty[idx]
    if test_subset:
        vx, vy = vx[:test_subset], vy[:test_subset]
    return (tx, ty), (vx, vy)


def synthetic(n_train: int = 512, n_test: int = 256, seed: int = 0, num_classes: int = 10):
    """Small learnable stand-in for Fashion-MNIST: class-dependent blobs plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, 1, 28, 28, generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return protos[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y
    return make(n_train), make(n_test)


def _class_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())


def _read_images(dataset, size, grayscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image
    from torchvision.transforms import functional as TF
    xs = []
    for path, _ in dataset.samples:
        try:
            with Image.open(path) as img:
                img = img.convert("L" if grayscale else "RGB")
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                xs.append(TF.pil_to_tensor(img))
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    return torch.stack(xs).float().div_(255.0), torch.tensor(dataset.targets, dtype=torch.long)


def _split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a train/test split that holds ``fraction`` of each class (at least one image
    of every class with two or more) out for testing, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def image_folder(folder, image_size: int | tuple[int, int] | None = None, mean=None, std=None,
                 test_fraction: float = 0.2, seed: int = 0, grayscale: bool = False):
    """(train_x, train_y), (test_x, test_y), info from a folder of images, one subfolder per class.

    The folder holds either ``train/`` and ``test/`` (or ``val/``) with the same class
    subfolders, or the class subfolders themselves, split here into train and test
    (``test_fraction`` of each class, by ``seed``: the same split every time).  Images are
    read with torchvision's ``ImageFolder`` conventions, as RGB (or one channel with
    ``grayscale``), resized to ``image_size`` (default: the first image's size) and normalised
    per channel with ``mean``/``std`` (default: measured on the training images).  ``info``
    holds ``classes``, ``mean``, ``std``, ``image_size``, ``channels`` and ``split``::

        (tx, ty), (vx, vy), info = image_folder("photos", image_size=64)
    """
    from torchvision.datasets import ImageFolder
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (imagefolder:DIR wants a folder of class subfolders)")
    test_dir = next((root / n for n in ("test", "val") if _class_folder(root / n)), None)
    separate = _class_folder(root / "train") and test_dir is not None
    try:
        sets = ([ImageFolder(root / "train"), ImageFolder(test_dir)] if separate else [ImageFolder(root)])
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"image folder {root}: {e}") from None
    if separate and sets[0].classes != sets[1].classes:
        raise DataError(f"image folder {root}: train/ and {test_dir.name}/ have different classes "
                        f"({sets[0].classes} vs {sets[1].classes})")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is None:
        from PIL import Image
        with Image.open(sets[0].samples[0][0]) as first:
            size = (first.height, first.width)
    tensors = [_read_images(d, size, grayscale) for d in sets]
    if separate:
        (tx, ty), (vx, vy) = tensors
    else:
        x, y = tensors[0]
        if not 0 < test_fraction < 1:
            raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        tr, te = _split(y, test_fraction, seed)
        (tx, ty), (vx, vy) = (x[tr], y[tr]), (x[te], y[te])
    channels = tx.shape[1]
    mean = torch.tensor(mean if mean is not None else tx.mean(dim=(0, 2, 3)).tolist(), dtype=torch.float32)
    std = torch.tensor(std if std is not None else tx.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist(), dtype=torch.float32)
    mean, std = (t.expand(channels).clone() if t.numel() == 1 else t for t in (mean, std))
    if mean.numel() != channels or std.numel() != channels:
        raise DataError(f"mean and std need 1 or {channels} values (one per channel), got {mean.numel()} and {std.numel()}")
    norm = lambda t: (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    info = {"classes": sets[0].classes, "mean": mean.tolist(), "std": std.tolist(), "image_size": list(size),
            "channels": channels, "split": "folders" if separate else f"{test_fraction:g} of each class, seed {seed}"}
    return (norm(tx), ty), (norm(vx), vy), info


def load(name: str = "fashion_mnist", root=None, train_subset: int | None = None, *, image_size=None, mean=None,
         std=None, test_fraction: float = 0.2, grayscale: bool = False, seed: int = 0):
    """(train, test, info) for a data set named as on the command line.

    ``fashion_mnist`` (from ``root`` or ``FXCOMPILE_DATA``), ``synthetic`` (generated, for
    trying things out) or ``imagefolder:DIR`` (:func:`image_folder`); ``info`` says the
    classes, channels, image size and normalisation, which is what a deployment needs to feed
    the model the same way::

        train, test, info = load("imagefolder:photos", image_size=32)
    """
    if name.startswith("imagefolder:"):
        train, test, info = image_folder(name[len("imagefolder:"):], image_size, mean, std, test_fraction, seed,
                                         grayscale)
    elif name == "fashion_mnist":
        train, test = fashion_mnist(root, train_subset=train_subset, seed=seed)
        return train, test, {"classes": [str(i) for i in range(10)], "mean": [MEAN], "std": [STD],
                             "image_size": [28, 28], "channels": 1, "split": "official"}
    elif name == "synthetic":
        train, test = synthetic(seed=seed)
        info = {"classes": [str(i) for i in range(10)], "mean": [0.0], "std": [1.0], "image_size": [28, 28],
                "channels": 1, "split": "generated"}
    else:
        raise DataError(f"unknown dataset {name!r}: use fashion_mnist, synthetic or imagefolder:DIR")
    if train_subset:
        idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[:train_subset]
        train = (train[0][idx], train[1][idx])
    return train, test, info
