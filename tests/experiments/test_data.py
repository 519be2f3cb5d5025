"""Data: synthetic stand-in shapes, and finding/loading IDX files offline in both layouts."""
import gzip
import struct

import pytest
import torch

from fxcompile.experiments.data import IDX_FILES, DataError, fashion_mnist, find_root, synthetic


def test_synthetic_shapes_and_determinism():
    (tx, ty), (vx, vy) = synthetic(n_train=64, n_test=32, seed=3)
    assert tx.shape == (64, 1, 28, 28) and vx.shape == (32, 1, 28, 28)
    assert ty.shape == (64,) and vy.shape == (32,)
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64
    assert 0 <= int(ty.min()) and int(ty.max()) < 10
    (tx2, ty2), _ = synthetic(n_train=64, n_test=32, seed=3)
    assert torch.equal(tx, tx2) and torch.equal(ty, ty2)
    (tx3, _), _ = synthetic(n_train=64, n_test=32, seed=4)
    assert not torch.equal(tx, tx3)


def _idx_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    return struct.pack(">IIII", 2051, n, 28, 28) + pixels.numpy().tobytes(), pixels


def _idx_labels(n, seed):
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.uint8)
    return struct.pack(">II", 2049, n) + labels.numpy().tobytes(), labels


def _write_idx(folder, n_train=12, n_test=5):
    folder.mkdir(parents=True, exist_ok=True)
    train_img, train_pixels = _idx_images(n_train, 0)
    train_lbl, train_labels = _idx_labels(n_train, 0)
    test_img, _ = _idx_images(n_test, 2)
    test_lbl, test_labels = _idx_labels(n_test, 2)
    for name, data in zip(IDX_FILES, (train_img, train_lbl, test_img, test_lbl)):
        with gzip.open(folder / name, "wb") as f:
            f.write(data)
    return train_pixels, train_labels, test_labels


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_find_root_and_load_gzipped_idx_offline(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    folder = root if layout == "flat" else root / "FashionMNIST" / "raw"
    pixels, labels, test_labels = _write_idx(folder)
    before = sorted(p.name for p in folder.iterdir())

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")
    import torchvision.datasets.utils as utils
    monkeypatch.setattr(utils, "download_and_extract_archive", no_network)
    monkeypatch.setattr(utils, "download_url", no_network)

    resolved = find_root(root)
    assert (resolved / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    (tx, ty), (vx, vy) = fashion_mnist(root)
    assert tx.shape == (12, 1, 28, 28) and vx.shape == (5, 1, 28, 28)
    assert torch.equal(ty, labels.long()) and torch.equal(vy, test_labels.long())
    from fxcompile.experiments.data import MEAN, STD
    assert torch.allclose(tx[:, 0], (pixels.float() / 255 - MEAN) / STD)
    assert sorted(p.name for p in folder.iterdir()) == before  # the data root is never written
    monkeypatch.setenv("FXCOMPILE_DATA", str(root))
    assert find_root() == resolved
    (sx, sy), _ = fashion_mnist(root, train_subset=4, seed=1)
    assert sx.shape == (4, 1, 28, 28) and all(any(torch.equal(s, t) for t in tx) for s in sx)


def test_find_root_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FXCOMPILE_DATA", raising=False)
    with pytest.raises(DataError, match="FXCOMPILE_DATA"):
        find_root()
    with pytest.raises(DataError) as info:
        find_root(tmp_path)
    assert str(tmp_path) in str(info.value) and all(f in str(info.value) for f in IDX_FILES)


def test_real_fashion_mnist_when_available(fashion_root):
    (tx, ty), (vx, vy) = fashion_mnist(fashion_root, train_subset=100)
    assert tx.shape == (100, 1, 28, 28) and vx.shape == (10000, 1, 28, 28)
    assert set(vy.unique().tolist()) == set(range(10))


def test_two_roots_do_not_share_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_idx(tmp_path / "a", n_train=7)
    _write_idx(tmp_path / "b", n_train=9)
    (ta, _), _ = fashion_mnist(tmp_path / "a")
    (tb, _), _ = fashion_mnist(tmp_path / "b")
    assert len(ta) == 7 and len(tb) == 9
    assert find_root(tmp_path / "a") != find_root(tmp_path / "b")


def test_runs_started_together_prepare_the_cache_without_tripping_over_each_other(tmp_path, monkeypatch):
    import concurrent.futures
    import threading
    import fxcompile.experiments.data as data
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_idx(tmp_path / "data", n_train=300)
    gate = threading.Barrier(4)
    real_copy = data.shutil.copyfileobj

    def copy_in_lockstep(fin, fout, *args):   # every worker is mid-write before any finishes
        real_copy(fin, fout, *args)
        gate.wait(timeout=10)
    monkeypatch.setattr(data.shutil, "copyfileobj", copy_in_lockstep)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: find_root(tmp_path / "data"), range(4)))
    assert len(set(roots)) == 1
    raw = roots[0] / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f[:-3] for f in IDX_FILES)  # no temporaries left
    monkeypatch.setattr(data.shutil, "copyfileobj", real_copy)
    (tx, _), _ = fashion_mnist(tmp_path / "data")
    assert tx.shape == (300, 1, 28, 28)
