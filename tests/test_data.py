"""Loading code on small data written by the tests themselves (no downloads, no network)."""

from __future__ import annotations

import gzip
import math
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pyro_vae import data
from pyro_vae.errors import InputError

IDX_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
H, W = 4, 3  # not square, so a swap of height and width shows


# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file: 0, 0, 0x08 (uint8), ndim, big-endian uint32 dims, then the uint8 data;
    gzip-compressed when the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw += array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw)
    return path


def write_idx_set(folder: Path, gz: bool, seed: int, n_train: int = 5, n_test: int = 3) -> dict:
    """The four MNIST files in `folder`; returns the arrays written, by split."""
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, H, W), dtype=np.uint8)
        images[0, 0, 0], images[-1, -1, -1] = 0, 255  # both ends of the range appear
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        image_stem, label_stem = data.IDX_FILES[split]
        write_idx(folder / (image_stem + ext), images)
        write_idx(folder / (label_stem + ext), labels)
        arrays[split] = (images, labels)
    return arrays


def assert_matches_idx(ds: data.Dataset, arrays: dict) -> None:
    for split in ("train", "test"):
        images, labels = arrays[split]
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        assert x.dtype == torch.float32
        assert x.shape == (len(images), 1, H, W)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        expected = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 255
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-7)
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.as_tensor(labels, dtype=torch.int64))


class FailingDownload:
    """Stands in for a torchvision dataset class: records the call, then fails like a network."""

    calls: list = []
    error: Exception = urllib.error.URLError("no route to host")

    def __init__(self, root, train=True, download=False, **kwargs):
        FailingDownload.calls.append((root, train, download))
        raise self.error


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test can download: torchvision's classes fail, and the system copy of fashion-mnist
    (which may exist on this machine) is replaced by a folder that does not exist."""
    FailingDownload.calls = []
    FailingDownload.error = urllib.error.URLError("no route to host")
    for cls in IDX_NAMES.values():
        monkeypatch.setattr(torchvision.datasets, cls, FailingDownload)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "no-system-dir")


# ----------------------------------------------------------------------------- IDX datasets


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("name", list(IDX_NAMES))
def test_idx_dataset_in_torchvision_layout(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path / "data" / IDX_NAMES[name] / "raw", gz, seed=1)
    ds = data.load_dataset(name, data_dir=tmp_path / "data")
    assert ds.name == name
    assert ds.shape == (1, H, W)
    assert_matches_idx(ds, arrays)
    assert FailingDownload.calls == []  # found locally: no download attempted


@pytest.mark.parametrize("layout", ["name", "flat"])
def test_idx_dataset_in_other_layouts(tmp_path, layout):
    folder = tmp_path / "data" / ("mnist" if layout == "name" else "")
    arrays = write_idx_set(folder, gz=True, seed=2)
    assert_matches_idx(data.load_dataset("mnist", data_dir=tmp_path / "data"), arrays)


def test_fashion_mnist_prefers_system_dir(tmp_path, monkeypatch):
    system = tmp_path / "system"
    system_arrays = write_idx_set(system, gz=True, seed=3)
    local_arrays = write_idx_set(tmp_path / "data" / "FashionMNIST" / "raw", gz=False, seed=4)
    assert not np.array_equal(system_arrays["train"][0], local_arrays["train"][0])
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", system)
    assert_matches_idx(data.load_dataset("fashion-mnist", data_dir=tmp_path / "data"), system_arrays)


def test_fashion_mnist_uses_data_dir_without_system_dir(tmp_path):
    # the autouse fixture points the system dir at a folder that does not exist
    assert not data.SYSTEM_DIRS["fashion-mnist"].exists()
    arrays = write_idx_set(tmp_path / "data" / "FashionMNIST" / "raw", gz=True, seed=5)
    assert_matches_idx(data.load_dataset("fashion-mnist", data_dir=tmp_path / "data"), arrays)


def test_fashion_mnist_system_dir_is_not_used_for_mnist(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "system", gz=True, seed=6)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion-mnist", tmp_path / "system")
    with pytest.raises(InputError):
        data.load_dataset("mnist", data_dir=tmp_path / "empty")


@pytest.mark.parametrize("error", [OSError("network unreachable"), urllib.error.URLError("no route to host")])
@pytest.mark.parametrize("name", list(IDX_NAMES))
def test_missing_files_and_failed_download_raise_input_error(tmp_path, name, error):
    FailingDownload.error = error
    data_dir = tmp_path / "nowhere"
    with pytest.raises(InputError, match=re.escape(str(data_dir))) as info:
        data.load_dataset(name, data_dir=data_dir)
    assert name in str(info.value)
    assert "\n" not in str(info.value)  # one line
    assert FailingDownload.calls and FailingDownload.calls[0] == (str(data_dir), True, True)


def test_download_writes_files_that_are_then_loaded(tmp_path, monkeypatch):
    written = {}

    class FakeMNIST:
        def __init__(self, root, train=True, download=False, **kwargs):
            if not written:
                written.update(write_idx_set(Path(root) / "MNIST" / "raw", gz=False, seed=7))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    ds = data.load_dataset("mnist", data_dir=tmp_path / "data")
    assert_matches_idx(ds, written)


def test_download_that_leaves_no_files_raises_input_error(tmp_path, monkeypatch):
    class SilentMNIST:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(torchvision.datasets, "MNIST", SilentMNIST)
    data_dir = tmp_path / "data"
    with pytest.raises(InputError, match=re.escape(str(data_dir / "MNIST" / "raw"))):
        data.load_dataset("mnist", data_dir=data_dir)


def test_images_and_labels_of_different_lengths_raise_input_error(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_idx_set(folder, gz=False, seed=8)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 images
    with pytest.raises(InputError, match="do not match"):
        data.load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = data.read_idx(write_idx(tmp_path / f"a-idx3-ubyte{suffix}", array))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_truncated(tmp_path, suffix):
    path = write_idx(tmp_path / f"a{suffix}", np.ones((2, 3, 4), np.uint8))
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    raw = raw[:-5]
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    with pytest.raises(InputError, match=re.escape(str(path))) as info:
        data.read_idx(path)
    assert "truncated" in str(info.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x08",
        b"\x01\x00\x08\x01\x00\x00\x00\x01\x00",
        b"\x00\x00\x07\x01\x00\x00\x00\x00",
        b"\x00\x00\x08\x00",
        b"PK\x03\x04 this is a zip file",
    ],
    ids=["short", "nonzero-first-byte", "unknown-type", "zero-dims", "other-format"],
)
def test_read_idx_bad_magic(tmp_path, raw):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(InputError, match=re.escape(str(path))) as info:
        data.read_idx(path)
    assert "magic" in str(info.value)


GZIP_HEADER = gzip.compress(b"", mtime=0)[:10]


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not gzip at all",
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200), mtime=0)[:-12],
        GZIP_HEADER + b"\x07" + bytes(16),  # deflate block of the reserved type: zlib.error
    ],
    ids=["not-gzip", "cut-short", "bad-deflate-stream"],
)
def test_read_idx_corrupt_gzip(tmp_path, raw):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(raw)
    with pytest.raises(InputError, match=re.escape(str(path))):
        data.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "missing-idx3-ubyte"
    with pytest.raises(InputError, match=re.escape(str(path))):
        data.read_idx(path)


# ----------------------------------------------------------------------------- digits


def _rows(x: torch.Tensor, y: torch.Tensor) -> list[tuple]:
    """Each example as (label, 64 pixel levels 0..16), sorted: the multiset of a split."""
    levels = (x.reshape(len(x), -1) * 16).round().to(torch.int64)
    return sorted(zip(y.tolist(), map(tuple, levels.tolist()), strict=True))


def test_digits_shape_range_and_split():
    from sklearn.datasets import load_digits

    ds = data.load_dataset("digits")
    assert ds.shape == (1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.test_x.shape[1:] == (1, 8, 8)
    for x in (ds.train_x, ds.test_x):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(ds.train_x.max()) == 1.0  # 16/16 appears: scaled by 16, not 255
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert len(ds.train_y) == len(ds.train_x) and len(ds.test_y) == len(ds.test_x)
    assert 0 < len(ds.test_x) < len(ds.train_x)
    # train and test together are exactly the 1797 digits (with their labels), each once
    bunch = load_digits()
    everything = _rows(torch.cat([ds.train_x, ds.test_x]), torch.cat([ds.train_y, ds.test_y]))
    assert everything == sorted(
        zip(
            bunch.target.tolist(),
            map(tuple, bunch.images.reshape(1797, -1).astype(int).tolist()),
            strict=True,
        )
    )


def test_digits_split_is_deterministic():
    a, b = data.load_dataset("digits"), data.load_dataset("digits")
    for field in ("train_x", "test_x", "train_y", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))


def test_digits_subsets_keep_the_first_examples():
    full = data.load_dataset("digits")
    small = data.load_dataset("digits", train_size=10, test_size=7)
    assert small.train_x.shape == (10, 1, 8, 8) and small.test_x.shape == (7, 1, 8, 8)
    assert torch.equal(small.train_x, full.train_x[:10])
    assert torch.equal(small.test_y, full.test_y[:7])
    only_train = data.load_dataset("digits", train_size=3)
    assert len(only_train.train_x) == 3 and len(only_train.test_x) == len(full.test_x)


@pytest.mark.parametrize(
    "sizes, flag", [((0, None), "--train-size"), ((-3, None), "--train-size"), ((None, 0), "--test-size")]
)
def test_non_positive_sizes_raise_input_error(sizes, flag):
    train_size, test_size = sizes
    with pytest.raises(InputError, match=re.escape(flag)):
        data.load_dataset("digits", train_size=train_size, test_size=test_size)


# ----------------------------------------------------------------------------- arrays


def test_npy_uint8_images_are_scaled_and_split(tmp_path):
    n = 20
    array = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None] * 10, (n, 5, 6)).copy()
    np.save(tmp_path / "imgs.npy", array)
    ds = data.load_dataset(str(tmp_path / "imgs.npy"))
    assert ds.name == "imgs" and ds.shape == (1, 5, 6) and ds.train_x.dtype == torch.float32
    assert len(ds.test_x) == round(n * data.HELD_OUT_FRACTION) and len(ds.train_x) + len(ds.test_x) == n
    assert ds.train_y is None and ds.test_y is None
    # every example is constant (its index * 10 / 255); the two splits cover each index once
    seen = []
    for x in (ds.train_x, ds.test_x):
        flat = x.reshape(len(x), -1)
        assert torch.equal(flat, flat[:, :1].expand_as(flat))
        seen += (flat[:, 0] * 255 / 10).round().to(torch.int64).tolist()
        torch.testing.assert_close(flat[:, 0], torch.tensor(seen[-len(x) :]) * 10 / 255.0)
    assert sorted(seen) == list(range(n))


def test_npy_float_values_are_kept(tmp_path):
    array = np.linspace(-3.0, 5.0, 10 * 2 * 3 * 3).reshape(10, 2, 3, 3)  # float64, outside [0, 1]
    np.save(tmp_path / "f.npy", array)
    ds = data.load_dataset(str(tmp_path / "f.npy"))
    assert ds.shape == (2, 3, 3) and ds.train_x.dtype == torch.float32
    expected = {tuple(row) for row in torch.as_tensor(array, dtype=torch.float32).reshape(10, -1).tolist()}
    got = [tuple(row) for row in torch.cat([ds.train_x, ds.test_x]).reshape(10, -1).tolist()]
    assert sorted(got) == sorted(expected)
    assert float(torch.cat([ds.train_x, ds.test_x]).min()) == -3.0  # not clipped to [0, 1]


def test_npy_vectors_become_one_by_d_images(tmp_path):
    array = np.random.default_rng(0).random((12, 7)).astype(np.float32)
    np.save(tmp_path / "v.npy", array)
    ds = data.load_dataset(str(tmp_path / "v.npy"))
    assert ds.shape == (1, 1, 7)
    assert ds.train_x.shape == (len(ds.train_x), 1, 1, 7)


def test_npz_with_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        "x_test": rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
        "y_train": np.arange(6),
        "y_test": np.array([7, 8, 9]),
    }
    np.savez(tmp_path / "d.npz", **arrays)
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    torch.testing.assert_close(ds.train_x, torch.as_tensor(arrays["x_train"]).float().unsqueeze(1) / 255)
    torch.testing.assert_close(ds.test_x, torch.as_tensor(arrays["x_test"]).float().unsqueeze(1) / 255)
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == list(range(6)) and ds.test_y.tolist() == [7, 8, 9]


def test_npz_with_x_and_y_is_split_with_labels_following_images(tmp_path):
    n = 30
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None], (n, 5)).copy()
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(n))
    ds = data.load_dataset(str(tmp_path / "xy.npz"))
    assert len(ds.test_x) == 3 and len(ds.train_x) == 27
    for xs, ys in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert torch.equal(xs[:, 0, 0, 0].to(torch.int64), ys)
    assert sorted(ds.train_y.tolist() + ds.test_y.tolist()) == list(range(n))


@pytest.mark.parametrize(
    "arrays, pattern",
    [
        ({"images": np.zeros((4, 3, 3))}, "expected 'x_train'"),
        ({"x_train": np.zeros((4, 3, 3))}, "expected 'x_train'"),
        ({"x": np.array(["a", "b", "c"])}, "numeric"),
        ({"x": np.zeros((4, 3, 3), dtype=bool)}, "numeric"),
        ({"x": np.zeros(5)}, "shape"),
        ({"x": np.full((4, 3, 3), np.nan)}, "NaN"),
        ({"x_train": np.zeros((3, 2, 2)), "x_test": np.array([[[np.inf, 0], [0, 0]]])}, "infinite"),
        ({"x": np.zeros((0, 3, 3))}, "empty"),
        ({"x": np.zeros((0, 5))}, "empty"),
        ({"x": np.zeros((5, 0))}, "empty"),
        ({"x_train": np.zeros((0, 3, 3)), "x_test": np.zeros((2, 3, 3))}, "empty"),
    ],
    ids=[
        "wrong-keys",
        "no-x-test",
        "strings",
        "bool",
        "1d",
        "nan",
        "inf",
        "empty-nhw",
        "empty-nd",
        "zero-width",
        "empty-train",
    ],
)
def test_bad_npz_raises_input_error(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=pattern):
        data.load_dataset(str(path))


def test_object_array_raises_input_error(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=re.escape(str(path))):
        data.load_dataset(str(path))


def test_file_that_is_not_numpy_raises_input_error(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"definitely not an npy file")
    with pytest.raises(InputError, match=re.escape(str(path))):
        data.load_dataset(str(path))


def test_nonexistent_array_file_raises_input_error(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(InputError, match="does not exist"):
        data.load_dataset(str(path))


@pytest.mark.parametrize("name", ["cifar10", "MNIST", "no/such/folder"])
def test_unknown_dataset_raises_input_error(name):
    with pytest.raises(InputError, match="unknown dataset"):
        data.load_dataset(name)


# ----------------------------------------------------------------------------- image folders

COLORS = {"apple": (200, 30, 10), "berry": (20, 60, 220)}  # class folders, sorted -> labels 0, 1


def _gray(rgb: tuple[int, int, int]) -> float:
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)) / 255.0


def write_images(root: Path, per_class: int, size=(6, 5)) -> None:
    for cls, color in COLORS.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, color).save(root / cls / f"{i}.png")


def test_image_folder_grayscale_resized_with_labels(tmp_path):
    write_images(tmp_path / "pics", per_class=5)
    ds = data.load_dataset(str(tmp_path / "pics"), image_size=4)
    assert ds.name == "pics" and ds.shape == (1, 4, 4) and ds.train_x.dtype == torch.float32
    assert len(ds.train_x) + len(ds.test_x) == 10 and len(ds.test_x) == 1
    grays = torch.tensor([_gray(COLORS["apple"]), _gray(COLORS["berry"])])
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        torch.testing.assert_close(x, grays[y].reshape(-1, 1, 1, 1).expand_as(x), rtol=0, atol=1e-6)
    assert sorted(ds.train_y.tolist() + ds.test_y.tolist()) == [0] * 5 + [1] * 5


def test_image_folder_rgb(tmp_path):
    write_images(tmp_path / "pics", per_class=2)
    ds = data.load_dataset(str(tmp_path / "pics"), image_size=3, channels=3)
    assert ds.shape == (3, 3, 3)
    rgb = torch.tensor([COLORS["apple"], COLORS["berry"]], dtype=torch.float32) / 255
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        torch.testing.assert_close(x, rgb[y].reshape(-1, 3, 1, 1).expand_as(x), rtol=0, atol=1e-6)


def test_image_folder_grayscale_source_to_rgb(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "g" / cls).mkdir(parents=True)
        Image.new("L", (4, 4), 100).save(tmp_path / "g" / cls / "0.png")
    ds = data.load_dataset(str(tmp_path / "g"), image_size=4, channels=3)
    x = torch.cat([ds.train_x, ds.test_x])
    assert x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x, torch.full_like(x, 100 / 255), rtol=0, atol=1e-6)


def test_image_folder_default_size_is_28(tmp_path):
    write_images(tmp_path / "pics", per_class=1)
    assert data.load_dataset(str(tmp_path / "pics")).shape == (1, 28, 28)


def test_image_folder_with_train_and_test(tmp_path):
    write_images(tmp_path / "pics" / "train", per_class=3)
    write_images(tmp_path / "pics" / "test", per_class=1, size=(9, 9))
    ds = data.load_dataset(str(tmp_path / "pics"), image_size=5)
    assert ds.train_x.shape == (6, 1, 5, 5) and ds.test_x.shape == (2, 1, 5, 5)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 1]
    torch.testing.assert_close(ds.test_x[1], torch.full((1, 5, 5), _gray(COLORS["berry"])))


def test_image_folder_bad_channels_raises_input_error(tmp_path):
    write_images(tmp_path / "pics", per_class=1)
    with pytest.raises(InputError, match="--channels"):
        data.load_dataset(str(tmp_path / "pics"), channels=2)


def test_image_folder_without_class_folders_raises_input_error(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4), 0).save(tmp_path / "flat" / "a.png")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "flat"))):
        data.load_dataset(str(tmp_path / "flat"))


def test_image_folder_with_unreadable_image_raises_input_error(tmp_path):
    write_images(tmp_path / "pics", per_class=2)
    (tmp_path / "pics" / "apple" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read images"):
        data.load_dataset(str(tmp_path / "pics"))


# ----------------------------------------------------------------------------- binarize, batches


@pytest.mark.parametrize("p", [0.1, 0.5, 0.83])
def test_binarize_draws_bernoulli(p):
    n = 20_000
    x = torch.full((n // 4, 1, 2, 2), p)
    out = data.binarize(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(out.mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_binarize_per_pixel_probability_and_ends():
    n = 10_000
    x = torch.cat([torch.zeros(n), torch.ones(n), torch.full((n,), 0.25)])
    out = data.binarize(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[:n], torch.zeros(n)) and torch.equal(out[n : 2 * n], torch.ones(n))
    assert abs(float(out[2 * n :].mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


def test_binarize_is_reproducible_with_a_seed():
    x = torch.rand(100, generator=torch.Generator().manual_seed(2))
    a = data.binarize(x, generator=torch.Generator().manual_seed(3))
    b = data.binarize(x, generator=torch.Generator().manual_seed(3))
    c = data.binarize(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_binarize_refuses_values_outside_unit_interval(bad):
    x = torch.tensor([0.0, 0.5, bad])
    with pytest.raises(InputError, match=re.escape("[0, 1]")):
        data.binarize(x)


@pytest.mark.parametrize("n, batch_size, sizes", [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (4, 10, [4])])
def test_batch_indices_cover_range_once(n, batch_size, sizes):
    batches = list(data.batch_indices(n, batch_size, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == sizes
    assert all(b.dtype == torch.int64 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))


def test_batch_indices_are_seeded_permutations():
    def order(seed):
        return torch.cat(list(data.batch_indices(50, 8, torch.Generator().manual_seed(seed))))

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert not torch.equal(order(0), torch.arange(50))  # shuffled, not in order


# ----------------------------------------------------------------------------- Dataset


def test_dataset_to_cpu_keeps_tensors():
    x, t = torch.rand(4, 1, 2, 2), torch.rand(2, 1, 2, 2)
    ds = data.Dataset("d", x, t, torch.arange(4), None)
    moved = ds.to("cpu")
    assert moved.name == "d" and moved.shape == (1, 2, 2)
    assert torch.equal(moved.train_x, x) and torch.equal(moved.test_x, t)
    assert torch.equal(moved.train_y, torch.arange(4)) and moved.test_y is None
    assert all(v.device.type == "cpu" for v in (moved.train_x, moved.test_x, moved.train_y))
