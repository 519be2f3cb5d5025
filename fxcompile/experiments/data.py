"""Fashion-MNIST through torchvision, from a data root flag or ``FXCOMPILE_DATA``.

The root may be torchvision's layout (``<root>/FashionMNIST/raw/*.gz``) or a folder that
holds the four official IDX files directly.  Nothing is ever downloaded.
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

__all__ = ["IDX_FILES", "find_root", "fashion_mnist", "synthetic", "DataError"]

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
