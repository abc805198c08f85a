"""The data a training run sees: the dataset loaded, binarized as the config says and checked
against the likelihood's support, or with --workers an image folder streamed batch by batch; and its
batches, epoch by epoch (TrainingBatches)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset

from ..config import Config
from ..data import (
    Dataset,
    ImageStream,
    UnreadableImage,
    batch_indices,
    binarize,
    binarize_like_authors,
    check_subset_size,
    image_folder_parts,
    load_dataset,
    read_images,
)
from ..errors import InputError
from ..models.kind import ModelKind, binarization, model_kind
from ..models.likelihoods import make_likelihood
from . import distributed
from .labelled_batches import LabelledBatches


def prepare_data(config: Config, kind: ModelKind | None = None) -> Dataset:
    """The dataset as training sees it. With --validation-size N, N training examples drawn by a seeded
    permutation become the validation set (val_x) (with --heldout authors: the last N). 'static'
    binarizes train, validation and test once (fixed seed); 'dynamic' keeps train as probabilities
    (redrawn each epoch) and binarizes validation and test once (--heldout authors: as the authors' code
    draws them, data.binarize_like_authors); 'none' uses the values as they are. The data must lie in
    the support of config.likelihood. The model kind (by default config.model's) shapes the training
    set (e.g. the labelled subset of M2: ModelKind.training_data)."""
    data = load_dataset(config.dataset, config.data_dir, config.train_size, config.test_size,
                        config.image_size, config.channels)
    authors = config.heldout == "authors"
    if config.validation_size is not None:
        data = (split_last(data, config.validation_size) if authors
                else split_validation(data, config.validation_size, config.seed))
    data = (kind or model_kind(config.model)).training_data(config, data)
    mode = binarization(config)
    if mode != "none":
        if authors:
            val_x, test_x = binarize_like_authors(data.val_x, data.test_x)
        else:
            test_x = binarize_held_out(data.test_x)
            val_x = None if data.val_x is None else binarize_held_out(data.val_x, 1)
        train_x = (binarize(data.train_x, torch.Generator().manual_seed(config.seed))
                   if mode == "static" else data.train_x)
        data = Dataset(data.name, train_x, test_x, data.train_y, data.test_y, val_x, data.val_y)
    likelihood = make_likelihood(config.likelihood, sigma=config.sigma, sigma_mode=config.sigma_mode)
    for x in (data.train_x, data.test_x, data.val_x):
        if x is not None:
            likelihood.check(x)
    return data


HELD_OUT_SEED = 0  # validation and test images are binarized once, the same for every run


def binarize_held_out(x: Tensor, stream: int = 0) -> Tensor:
    """Held-out images binarized once with a fixed seed (not the run's --seed), so runs with other seeds
    are scored on the same test set and their per-example values can be paired; stream 1 for validation."""
    return binarize(x, torch.Generator().manual_seed(HELD_OUT_SEED + stream))


def split_validation(data: Dataset, size: int, seed: int) -> Dataset:
    """`size` training examples, drawn by a permutation seeded with `seed`, as the validation set; the
    rest (in their order) as the training set."""
    n = data.train_x.shape[0]
    check_validation_size(size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:size], order[size:].sort().values
    pick = lambda t: None if t is None else t[kept]  # noqa: E731
    return Dataset(data.name, data.train_x[kept], data.test_x, pick(data.train_y), data.test_y,
                   data.train_x[held], None if data.train_y is None else data.train_y[held])


def split_last(data: Dataset, size: int) -> Dataset:
    """The last `size` training examples as the validation set, the others (in their order) as the
    training set: the authors' split (Fashion-MNIST and MNIST: images 50,000 to 59,999 held out)."""
    n = data.train_x.shape[0]
    check_validation_size(size, n)
    cut = lambda t: None if t is None else t[:n - size]  # noqa: E731
    return Dataset(data.name, data.train_x[:n - size], data.test_x, cut(data.train_y), data.test_y,
                   data.train_x[n - size:], None if data.train_y is None else data.train_y[n - size:])


def check_validation_size(size: int, n: int) -> None:
    """Refuse a validation set that leaves no training example."""
    if size >= n:
        raise InputError(f"--validation-size {size} holds out that many of the {n} training examples and "
                         "leaves none to train on; make it smaller than the training set")


def prepare_stream(config: Config) -> tuple[ImageStream, Dataset]:
    """With --workers N: the training images of an image folder as an ImageStream that N worker
    processes read batch by batch, and the Dataset with the test images loaded whole (binarized once,
    as prepare_data does) and no training images in memory (train_x is empty)."""
    root = Path(config.dataset)
    if not root.is_dir():
        raise InputError(f"--workers {config.workers} streams the images of a folder, and {config.dataset!r} "
                         "is not one; leave --workers at 0 (the data then lives on the device)")
    if config.validation_size is not None:
        raise InputError(f"--validation-size {config.validation_size} holds out training images in memory; "
                         "with --workers they are streamed: leave --workers at 0 for a validation set")
    mode = binarization(config)
    if mode == "static" or config.prior_init == "data":
        what = "--binarize static" if mode == "static" else "--prior-init data"
        raise InputError(f"{what} needs the training images in memory; with --workers use --binarize "
                         "dynamic or none and --prior-init noise, or leave --workers at 0")
    train, test = image_folder_parts(root, config.image_size or 28, config.channels)
    check_subset_size("train", config.train_size, len(train), root.name)
    check_subset_size("test", config.test_size, len(test), root.name)
    train = Subset(train, range(config.train_size or len(train)))
    test_x, test_y = read_images(Subset(test, range(config.test_size or len(test))), root)
    if mode != "none":
        test_x = binarize_held_out(test_x)
    make_likelihood(config.likelihood, sigma=config.sigma, sigma_mode=config.sigma_mode).check(test_x)
    return ImageStream(train, config.workers), Dataset(root.name, test_x[:0], test_x, None, test_y)


def streamed(stream: ImageStream, order: list[Tensor], start: int, ranks: distributed.Ranks,
              device: torch.device, key: tuple[int, ...] | None) -> Iterator[Tensor]:
    """The batches order[start:] (this process's share of each) read by the stream's workers; with a
    key, binarized, batch b by a generator seeded from (key, b), so a resumed epoch draws the same."""
    lists = [ranks.shard(idx).tolist() for idx in order[start:]]
    for b, x in enumerate(stream.batches(lists, device), start):
        if key is None:
            yield x
        else:
            yield binarize(x, torch.Generator(device).manual_seed(hash((*key, b)) & (2**63 - 1)))


def stop_on_unreadable(xs: Iterator[Tensor], stop: Callable[[UnreadableImage], None]) -> Iterator[Tensor]:
    """The batches of xs; if the stream meets an image it cannot read, stop(err) (which raises)."""
    try:
        yield from xs
    except UnreadableImage as err:
        stop(err)
        raise


class TrainingBatches:
    """The training images a run steps through, epoch by epoch: `data`'s, on the device, or with --workers
    read by `stream`'s workers. `n_train` examples, `n_batches` global batches of --batch-size an epoch
    (with several processes, a last batch too small to share among them is left out); each process steps
    through its share of each. With --labelled-per-batch M (`labelled`: labelled_batches.py) every batch
    holds M labelled examples first and an epoch is one pass over the unlabelled ones (one process only);
    `examples_per_epoch` counts the examples of an epoch's batches."""

    def __init__(self, data: Dataset, stream: ImageStream | None, config: Config, ranks: distributed.Ranks,
                 device: torch.device):
        self.data, self.stream, self.ranks, self.device = data, stream, ranks, device
        self.batch_size, self.seed = config.batch_size, config.seed
        self.dynamic = binarization(config) == "dynamic"
        n = self.n_train = len(stream) if stream else data.train_x.shape[0]
        self.n_batches = math.ceil(n / self.batch_size) - ranks.drops_last(n, self.batch_size)
        self.examples_per_epoch = n
        self.labelled = None
        if config.labelled_per_batch is not None:
            if ranks.active:
                raise InputError(f"--labelled-per-batch {config.labelled_per_batch} puts the labelled "
                                 "examples first in each batch, which several processes would not share; "
                                 "train in one process, or drop --labelled-per-batch")
            self.labelled = LabelledBatches(data.train_y, self.batch_size, config.labelled_per_batch)
            self.n_batches = self.labelled.n_batches
            self.examples_per_epoch = self.labelled.examples_per_epoch

    def epoch(self, generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
        """An epoch's images (with --binarize dynamic, a fresh draw) and its order of global batches (index
        tensors), both drawn from `generator`."""
        x = binarize(self.data.train_x, generator) if self.dynamic else self.data.train_x
        if self.labelled is not None:
            return x, self.labelled.epoch(generator)
        order = list(batch_indices(self.n_train, self.batch_size, generator, self.device))
        return x, order[:self.n_batches]

    def batches(self, x: Tensor, order: list[Tensor], start: int, epoch: int,
                unreadable: Callable[[UnreadableImage], None]) -> Iterator[Tensor]:
        """This process's share of each batch order[start:] of epoch `epoch`: rows of its images `x`, or
        read by the stream's workers (dynamic: binarized as `streamed` says); an image the stream cannot
        read calls unreadable(err), which raises."""
        if self.stream is None:
            return (x[self.ranks.shard(idx)] for idx in order[start:])
        key = (self.seed, epoch, self.ranks.rank) if self.dynamic else None
        xs = streamed(self.stream, order, start, self.ranks, self.device, key)
        return stop_on_unreadable(xs, unreadable)

    def again(self, x: Tensor, idx: Tensor) -> Tensor:
        """This process's share of batch `idx` once more: rows of `x`, or read again (not binarized)."""
        if self.stream is None:
            return x[self.ranks.shard(idx)]
        return next(streamed(self.stream, [idx], 0, self.ranks, self.device, None))
