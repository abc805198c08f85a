"""Datasets -> tensors on a device: the embedded digits, torchvision's IDX datasets, image folders
and arrays; binarization; index-based batching.

Every dataset arrives as float32 images of shape (N, C, H, W). Built-in image datasets are scaled
to [0, 1]; user arrays keep their values (uint8 arrays are divided by 255) and the likelihood
checks them against its support.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset

from .errors import InputError

BUILTIN = ("digits", "mnist", "fashion-mnist", "kmnist")
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
SYSTEM_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BINARIZE_MODES = ("none", "static", "dynamic")
HELD_OUT_FRACTION = 0.1  # test share for user data that comes without a split
SPLIT_SEED = 0  # the fixed permutation behind every split we make ourselves


# the names of the labels of the datasets we know, by label (the latent map's legend)
CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}


@dataclass
class Dataset:
    """Train and test images (N, C, H, W) float32, with integer labels where the data has them, and
    validation images held out of the training set where a run asks for them."""

    name: str
    train_x: Tensor
    test_x: Tensor
    train_y: Tensor | None = None
    test_y: Tensor | None = None
    val_x: Tensor | None = None
    val_y: Tensor | None = None  # the labels of the validation images, where the data have labels

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape (C, H, W) of one example."""
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(
            self.name, move(self.train_x), move(self.test_x), move(self.train_y), move(self.test_y),
            move(self.val_x), move(self.val_y),
        )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike = "data",
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | None = None,
    channels: int = 1,
) -> Dataset:
    """Load a dataset by name (`digits`, `mnist`, `fashion-mnist`, `kmnist`) or by path (a folder
    of images, a `.npy` or `.npz` file); `train_size`/`test_size` keep the first N examples."""
    if name == "digits":
        data = _digits()
    elif name in TORCHVISION_CLASSES:
        data = _idx_dataset(name, Path(data_dir))
    elif Path(name).is_dir():
        data = _image_folder(Path(name), image_size or 28, channels)
    elif name.endswith((".npy", ".npz")):
        data = _array_file(Path(name))
    else:
        raise InputError(
            f"unknown dataset {name!r}: choose one of {', '.join(BUILTIN)}, "
            "or give an existing folder of images or a .npy/.npz file"
        )
    _check_finite(data)
    return _subset(data, train_size, test_size)


RESCALE_HINT = "e.g. divide 0..255 pixel values by 255, or save them as uint8, which pyro-vae divides by 255"


def binarize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli draw per pixel with the pixel's value as probability: x_b ~ Bernoulli(x)."""
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):  # written so that NaN fails too
        lo, hi = float(x.min()), float(x.max())
        raise InputError(f"binarization needs pixel values in [0, 1], but the data range over "
                         f"[{lo:g}, {hi:g}]; rescale them to [0, 1] first ({RESCALE_HINT})")
    return torch.bernoulli(x, generator=generator)


AUTHORS_SEED = 777  # the NumPy seed the VampPrior and Exemplar VAE code binarize validation and test with


def binarize_like_authors(val_x: Tensor | None, test_x: Tensor) -> tuple[Tensor | None, Tensor]:
    """Validation and test images binarized once as the authors' loaders do (Exemplar VAE's
    base_load_data.binarize, VampPrior's load_data): np.random.seed(777), then
    np.random.binomial(1, x_val), then np.random.binomial(1, x_test), each over the images flattened
    (N, pixels) in row-major order, with probabilities in float64. Drawn from a RandomState(777) of our
    own, which gives the same draws as the global generator after np.random.seed(777) (NumPy's legacy
    stream, frozen by NEP 19) and leaves NumPy's global state alone. Pixel values that are k/255 (the
    uint8 datasets, stored in float32) become k/255 in float64, as the authors' uint8 / 255. gives."""
    rng = np.random.RandomState(AUTHORS_SEED)
    draw = lambda x: torch.as_tensor(  # noqa: E731
        rng.binomial(1, _authors_probabilities(x)).reshape(x.shape), dtype=x.dtype, device=x.device)
    val = None if val_x is None else draw(val_x)
    return val, draw(test_x)


def _authors_probabilities(x: Tensor) -> np.ndarray:
    """x as a float64 (N, pixels) array, pixel values that are multiples of 1/255 as k/255 in float64."""
    if x.numel() and not (x.min() >= 0 and x.max() <= 1):
        binarize(x)  # says what is wrong with the range
    p = x.detach().cpu().double().numpy().reshape(x.shape[0], -1)
    k = np.rint(p * 255.0)
    return k / 255.0 if np.abs(p * 255.0 - k).max(initial=0.0) < 1e-3 else p


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Iterator[Tensor]:
    """A fresh random permutation of range(n), cut into index tensors of `batch_size` (the last may
    be shorter), drawn on `device` so batching never copies data between host and device."""
    order = torch.randperm(n, generator=generator, device=device)
    yield from order.split(batch_size)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed if the name ends in .gz)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise InputError(f"cannot read IDX file {path}: {err}; delete it and fetch it again") from None
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes or raw[3] == 0:
        raise InputError(f"{path} is not an IDX file (bad magic number); delete it and fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(dtypes[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise InputError(
            f"{path} is truncated or corrupt ({len(raw)} bytes, expected {expected} for shape "
            f"{tuple(dims)}); delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _digits() -> Dataset:
    """scikit-learn's 8x8 UCI digits (1797 images, values 0..16 scaled to [0, 1]); a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return _split("digits", x, y, test_fraction=0.2)


def _idx_dataset(name: str, data_dir: Path) -> Dataset:
    """MNIST-format data: IDX files found locally (system package, torchvision's layout under
    `data_dir`, or `data_dir` itself), else torchvision's download into `data_dir`."""
    cls = TORCHVISION_CLASSES[name]
    candidates = [SYSTEM_DIRS.get(name), data_dir / cls / "raw", data_dir / name, data_dir]
    for folder in filter(None, candidates):
        files = {split: _find_idx(folder, stems) for split, stems in IDX_FILES.items()}
        if all(files.values()):
            return _from_idx(name, files)
    _download(name, cls, data_dir)
    files = {split: _find_idx(data_dir / cls / "raw", stems) for split, stems in IDX_FILES.items()}
    if not all(files.values()):
        raise InputError(
            f"{name} was downloaded but its IDX files are not in {data_dir / cls / 'raw'}; "
            "put them there or pass --data-dir"
        )
    return _from_idx(name, files)


def _find_idx(folder: Path, stems: tuple[str, str]) -> tuple[Path, Path] | None:
    """The (images, labels) pair in `folder`, gzip-compressed or not, if both are there."""
    found = []
    for stem in stems:
        path = next((folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def _from_idx(name: str, files: dict[str, tuple[Path, Path]]) -> Dataset:
    """Build a dataset from IDX (images, labels) pairs; uint8 pixels are scaled to [0, 1]."""
    tensors = {}
    for split, (images, labels) in files.items():
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise InputError(
                f"{images} and {labels} do not match: images {x.shape}, labels {y.shape}; "
                "expected (N, H, W) images and N labels"
            )
        tensors[split] = (
            torch.as_tensor(x.astype(np.float32) / 255.0).unsqueeze(1),
            torch.as_tensor(y.astype(np.int64)),
        )
    (train_x, train_y), (test_x, test_y) = tensors["train"], tensors["test"]
    return Dataset(name, train_x, test_x, train_y, test_y)


def _download(name: str, cls: str, data_dir: Path) -> None:
    """Let torchvision download `cls` into `data_dir` (it writes IDX files under cls/raw)."""
    import torchvision

    try:
        for train in (True, False):
            getattr(torchvision.datasets, cls)(root=str(data_dir), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raise InputError(
            f"{name} is not in {data_dir} and could not be downloaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); put its IDX files in "
            f"{data_dir / cls / 'raw'} or pass --data-dir"
        ) from None


def _image_folder(root: Path, image_size: int, channels: int) -> Dataset:
    """A folder of images in torchvision's ImageFolder layout (one subfolder per class), resized to
    image_size x image_size and converted to `channels` (1: grayscale, 3: RGB). A folder with
    `train/` and `test/` subfolders gives the split; otherwise a fixed 10% is held out."""
    train, test = image_folder_parts(root, image_size, channels)
    (train_x, train_y), (test_x, test_y) = read_images(train, root), read_images(test, root)
    return Dataset(root.name, train_x, test_x, train_y, test_y)


def read_images(part: TorchDataset, root: Path) -> tuple[Tensor, Tensor]:
    """All (image, label) items of a part of an image folder as float32 images in [0, 1] and labels."""
    try:
        pairs = [part[i] for i in range(len(part))]
    except (FileNotFoundError, OSError, RuntimeError) as err:
        raise InputError(f"cannot read images from {root}: {err}; use one subfolder per class "
                         "holding readable image files") from None
    x = torch.stack([p[0] for p in pairs]).float() / 255.0
    return x, torch.tensor([p[1] for p in pairs], dtype=torch.int64)


def image_folder_parts(
    root: Path, image_size: int = 28, channels: int = 1
) -> tuple[TorchDataset, TorchDataset]:
    """The train and test parts of an image folder, read lazily: items are (uint8 image (C, H, W),
    label). `train/` and `test/` subfolders give the split; otherwise a fixed HELD_OUT_FRACTION of the
    images (the same every time) is held out."""
    from torchvision import datasets, transforms

    steps = [transforms.Resize((image_size, image_size))]
    if channels == 1:
        steps.insert(0, transforms.Grayscale(num_output_channels=1))
    elif channels == 3:
        steps.insert(0, transforms.Lambda(_rgb))
    else:
        raise InputError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    transform = transforms.Compose([*steps, transforms.PILToTensor()])

    def open_folder(folder: Path) -> TorchDataset:
        try:
            return datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError, RuntimeError) as err:
            raise InputError(f"cannot read images from {folder}: {err}; use one subfolder per class "
                             "holding readable image files") from None

    if (root / "train").is_dir() and (root / "test").is_dir():
        return open_folder(root / "train"), open_folder(root / "test")
    items = open_folder(root)
    train, test = _split_indices(root.name, len(items), HELD_OUT_FRACTION)
    return Subset(items, train.tolist()), Subset(items, test.tolist())


def _rgb(image):
    """A PIL image as RGB (a module-level function, so DataLoader workers can pickle the transform)."""
    return image.convert("RGB")


class ImageStream:
    """Training images read from disk batch by batch by DataLoader worker processes, for image folders
    too large to hold on the device. Which images make up each batch is decided by the caller (the
    same global batches as on-device training), so any sampler - one process's share of each
    global batch, say - is a list of index lists."""

    def __init__(self, images: TorchDataset, workers: int):
        self.images, self.workers = images, workers

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, index_lists: list[list[int]], device: torch.device) -> Iterator[Tensor]:
        """The images of each list of indices, read ahead by the workers, as float32 (B, C, H, W) in
        [0, 1] on `device` (copied as uint8, from pinned memory on CUDA)."""
        loader = DataLoader(_ImagesOnly(self.images), batch_sampler=index_lists, num_workers=self.workers,
                            collate_fn=_stack_or_complain, pin_memory=device.type == "cuda")
        for x in loader:
            if isinstance(x, str):
                raise UnreadableImage(x)
            yield x.to(device, non_blocking=True).float() / 255.0


class UnreadableImage(InputError):
    """An image of a streamed folder could not be read (found by a worker, mid-epoch)."""


def _stack_or_complain(items: list[Tensor | str]) -> Tensor | str:
    """The batch's images stacked, or, if one could not be read, what was wrong with it (a message
    travels from a worker process intact, where an exception would arrive wrapped in its traceback)."""
    return next((item for item in items if isinstance(item, str)), None) or torch.stack(items)


class _ImagesOnly(TorchDataset):
    """The images of a dataset of (image, label) pairs."""

    def __init__(self, items: TorchDataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor | str:
        """Image i, or a message naming its file if it cannot be read."""
        try:
            return self.items[i][0]
        except (OSError, ValueError, RuntimeError) as err:  # PIL's UnidentifiedImageError is an OSError
            return f"cannot read image {_source(self.items, i)} ({err})"


def _source(items: TorchDataset, i: int) -> str:
    """The file behind item i of an ImageFolder, or of Subsets of one."""
    while isinstance(items, Subset):
        items, i = items.dataset, items.indices[i]
    samples = getattr(items, "samples", None)
    return samples[i][0] if samples is not None else f"number {i}"


def _array_file(path: Path) -> Dataset:
    """A `.npy` array (N, H, W), (N, C, H, W), (N, H, W, C) or (N, D), or a `.npz` with `x_train`/`x_test`
    (optional `y_train`/`y_test`) or `x` (optional `y`); uint8 values are divided by 255."""
    if not path.is_file():
        raise InputError(f"dataset file {path} does not exist; check the path")
    try:
        loaded = np.load(path, allow_pickle=False)
        arrays = {"x": loaded} if isinstance(loaded, np.ndarray) else {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read {path} as a numpy array file: {err}") from None
    if "x_train" in arrays and "x_test" in arrays:
        train_x, test_x = _images(arrays["x_train"], path), _images(arrays["x_test"], path)
        train_y = _labels(arrays.get("y_train"), len(train_x))
        test_y = _labels(arrays.get("y_test"), len(test_x))
        return Dataset(path.stem, train_x, test_x, train_y, test_y)
    if "x" not in arrays:
        raise InputError(
            f"{path} holds arrays {sorted(arrays)}; expected 'x_train' and 'x_test', or 'x'"
        )
    x = _images(arrays["x"], path)
    return _split(path.stem, x, _labels(arrays.get("y"), len(x)), HELD_OUT_FRACTION)


def _images(array: np.ndarray, path: Path) -> Tensor:
    """A user array as float32 (N, C, H, W) images."""
    if array.dtype.kind not in "uif" or array.ndim not in (2, 3, 4):
        raise InputError(
            f"{path}: images must be a numeric array of shape (N, D), (N, H, W) or (N, C, H, W), "
            f"got dtype {array.dtype} and shape {array.shape}"
        )
    if array.size == 0:
        raise InputError(f"{path}: images array is empty (shape {array.shape}); give some examples")
    x = torch.as_tensor(array.astype(np.float32))
    if array.dtype == np.uint8:
        x = x / 255.0
    if array.ndim == 4:
        return _channels_first(x, path)
    shape = {2: (len(x), 1, 1, x.shape[1]), 3: (len(x), 1, *x.shape[1:])}[array.ndim]
    return x.reshape(shape)


IMAGE_CHANNELS = (1, 3)  # grayscale, RGB: what the networks' figures and the image readers know


def _channels_first(x: Tensor, path: Path) -> Tensor:
    """A 4-d array as (N, C, H, W). An array whose last axis is short (<= 4) and whose second is long
    (> 4) is channels-last, (N, H, W, C): with C = 1 or 3 it is moved to (N, C, H, W), with another C
    refused (the figures read 1 or 3 channels). Any other array is taken as (N, C, H, W) as it is."""
    _, a, _, c = x.shape
    if c > 4 or a <= 4:
        return x
    if c in IMAGE_CHANNELS:  # (N, H, W, C): the layout numpy, PIL and TensorFlow use
        return x.permute(0, 3, 1, 2).contiguous()
    raise InputError(f"{path}: shape {tuple(x.shape)} looks like channels-last (N, H, W, C) images with "
                     f"C = {c}; pyro-vae reads (N, C, H, W), or (N, H, W, C) with C = 1 (grayscale) or 3 "
                     "(RGB): transpose the array to (N, C, H, W) (np.moveaxis(x, -1, 1))")


def _labels(array: np.ndarray | None, n: int) -> Tensor | None:
    """Integer labels, or None where the file has none or they do not match the images."""
    if array is None or array.shape != (n,) or array.dtype.kind not in "iu":
        return None
    return torch.as_tensor(array.astype(np.int64))


def _split(name: str, x: Tensor, y: Tensor | None, test_fraction: float) -> Dataset:
    """A fixed random split (same permutation every time) into train and held-out test."""
    train, test = _split_indices(name, len(x), test_fraction)
    pick = lambda t, i: None if t is None else t[i]  # noqa: E731
    return Dataset(name, x[train], x[test], pick(y, train), pick(y, test))


def _split_indices(name: str, n: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, test) indices of a fixed random split of range(n) (the same permutation every time)."""
    if n < 2:
        raise InputError(f"dataset {name!r} has {n} example(s); need at least 2 to split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def _check_finite(data: Dataset) -> None:
    for split, x in (("train", data.train_x), ("test", data.test_x)):
        if len(x) == 0:
            raise InputError(f"dataset {data.name!r} has no {split} examples")
        if not torch.isfinite(x).all():
            raise InputError(f"dataset {data.name!r} has NaN or infinite values in its {split} images")


def check_subset_size(split: str, size: int | None, available: int, dataset: str) -> None:
    """Raise InputError unless `size` (--train-size or --test-size, by `split`: 'train' or 'test') is
    None (all examples) or a positive number no larger than the `available` examples of `dataset`."""
    flag = f"--{split}-size"
    if size is not None and size < 1:
        raise InputError(f"{flag} must be a positive number of examples, got {size}")
    if size is not None and size > available:
        what = "training" if split == "train" else split
        raise InputError(f"{flag} {size} asks for more {what} examples than dataset {dataset!r} has "
                         f"({available}); give {available} or fewer, or leave {flag} out to use all of them")


def _subset(data: Dataset, train_size: int | None, test_size: int | None) -> Dataset:
    """Keep the first `train_size` / `test_size` examples (all where None)."""
    check_subset_size("train", train_size, data.train_x.shape[0], data.name)
    check_subset_size("test", test_size, data.test_x.shape[0], data.name)
    cut = lambda t, n: None if t is None else t[:n]  # noqa: E731
    return Dataset(
        data.name,
        cut(data.train_x, train_size),
        cut(data.test_x, test_size),
        cut(data.train_y, train_size),
        cut(data.test_y, test_size),
    )
