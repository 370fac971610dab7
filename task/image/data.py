"""Image data for the image task: datasets, the public split, label-skewed client partitions.

Datasets (``dataset`` key):
- ``fashion-mnist`` (offline default): Debian's ``dataset-fashion-mnist`` package (MIT; 60k
  train + 10k test 28x28 grayscale images, 10 classes) in /usr/share/datasets/fashion-mnist
  (``FASHION_MNIST_DIR`` overrides), zero-padded to 32x32.
- ``cifar10``: CIFAR-10 through flwr-datasets' FederatedDataset (Hugging Face hub, needs a network).

Splits, all seeded: ``pretrain-fraction`` of the training images is the public split the server
pre-trains the backbone on (no client holds it); the rest is split over the clients by label
with flwr-datasets' DirichletPartitioner (``dirichlet-alpha``; 0.1 gives each client one or two
classes) or IidPartitioner. Each client keeps ``test-fraction`` of its images as its local test
set. The dataset's test split is the server's real reference for KID and FID (no client
trains on it; global_test_rows).

An image example is one uint8 row ``[label, pixels...]`` (C*32*32 pixels, CHW order, like the
label-then-pixels CSV form of MNIST), so a client's data is one tensor: the strategies and the
centralized baseline treat it exactly like the text task's token blocks (len, indexing, cat).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from task.config import ConfigError, ImageConfig, RunConfig
from task.disk_cache import cached_blocks

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = 32


@dataclass(frozen=True)
class ImageDataset:
    train_images: np.ndarray  # (N, C, 32, 32) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle-boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


# --------------------------------------------------------------------------- sources
def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims, big-endian sizes, uint8 data)."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path:
    path = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not (path / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"dataset 'fashion-mnist' not found in {path}: install Debian's package "
            "(sudo apt-get install dataset-fashion-mnist; scripts/setup.sh does it) "
            "or set FASHION_MNIST_DIR")
    return path


def load_fashion_mnist() -> ImageDataset:
    root = fashion_mnist_dir()

    def images(name: str) -> np.ndarray:  # (N, 28, 28) -> (N, 1, 32, 32), black border
        return np.pad(_read_idx(root / name), ((0, 0), (2, 2), (2, 2)))[:, None]

    return ImageDataset(images("train-images-idx3-ubyte.gz"),
                        _read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64),
                        images("t10k-images-idx3-ubyte.gz"),
                        _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
                        FASHION_CLASSES)


def load_cifar10(cache_dir: Path) -> ImageDataset:  # pragma: no cover - needs the hub
    """CIFAR-10 through flwr-datasets (downloaded once, then kept as an .npz in the cache)."""
    cache = cache_dir / "images" / "cifar10.npz"
    if not cache.exists():
        from flwr_datasets import FederatedDataset

        fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": 1})
        arrays = {}
        for split in ("train", "test"):
            ds = fds.load_split(split).with_format("numpy")
            arrays[f"{split}_images"] = np.stack(ds["img"]).transpose(0, 3, 1, 2).astype(np.uint8)
            arrays[f"{split}_labels"] = np.asarray(ds["label"], dtype=np.int64)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"cifar10.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(cache)
    with np.load(cache) as f:
        return ImageDataset(f["train_images"], f["train_labels"], f["test_images"],
                            f["test_labels"], CIFAR10_CLASSES)


def load_images(cfg: RunConfig) -> ImageDataset:
    return _load_images(cfg.data.dataset, cfg.cache_path)


@lru_cache(maxsize=2)
def _load_images(dataset: str, cache_path: Path) -> ImageDataset:
    return load_fashion_mnist() if dataset == "fashion-mnist" else load_cifar10(cache_path)


def _split_key(cfg: RunConfig) -> RunConfig:
    """The config reduced to what the splits depend on (so runs and tests that differ in
    anything else, e.g. the strategy, share the cached partitions)."""
    return RunConfig(task=cfg.task, seed=cfg.seed, cache_dir=str(cfg.cache_path), data=cfg.data,
                     image=ImageConfig(pretrain_fraction=cfg.image.pretrain_fraction))


# --------------------------------------------------------------------------- rows
def pack_rows(images: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """(N, C, H, W) uint8 images + labels -> (N, 1 + C*H*W) uint8 rows [label, pixels]."""
    flat = images.reshape(len(images), -1)
    return torch.from_numpy(np.concatenate([labels[:, None].astype(np.uint8), flat], axis=1))


def unpack_rows(rows: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows -> (images as float in [-1, 1], (N, C, 32, 32); labels, long)."""
    images = rows[:, 1:].reshape(len(rows), channels, IMAGE_SIZE, IMAGE_SIZE)
    return images.float() / 127.5 - 1.0, rows[:, 0].long()


# --------------------------------------------------------------------------- splits
def public_and_pool(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """Training-image indices of the server's public split and of the clients' pool."""
    return _public_and_pool(_split_key(cfg))


@lru_cache(maxsize=4)
def _public_and_pool(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    n = len(load_images(cfg).train_labels)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_public = int(round(cfg.image.pretrain_fraction * n))
    return np.sort(order[:n_public]), np.sort(order[n_public:])


def image_partitions(cfg: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-image indices of every client, reproducible from the seed."""
    return _image_partitions(_split_key(cfg), num_partitions)


@lru_cache(maxsize=8)
def _image_partitions(cfg: RunConfig, num_partitions: int) -> tuple[np.ndarray, ...]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    _, pool = public_and_pool(cfg)
    labels = load_images(cfg).train_labels[pool]
    ds = Dataset.from_dict({"index": pool, "label": labels})
    if cfg.data.partitioner == "iid":
        ds = ds.shuffle(seed=cfg.seed).flatten_indices()
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                           alpha=cfg.data.dirichlet_alpha, min_partition_size=4,
                                           self_balancing=True, seed=cfg.seed)
    partitioner.dataset = ds
    return tuple(np.asarray(partitioner.load_partition(p).with_format("numpy")[:]["index"])
                 for p in range(num_partitions))


def client_image_rows(cfg: RunConfig, partition_id: int,
                      num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, local-test rows) of one client."""
    return _client_image_rows(_split_key(cfg), partition_id, num_partitions)


@lru_cache(maxsize=1024)
def _client_image_rows(cfg: RunConfig, partition_id: int,
                       num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    data = load_images(cfg)
    idx = image_partitions(cfg, num_partitions)[partition_id]
    idx = idx[np.random.default_rng([cfg.seed, partition_id]).permutation(len(idx))]
    n_test = min(len(idx) - 1, max(1, int(round(cfg.data.test_fraction * len(idx)))))
    train, test = np.sort(idx[n_test:]), np.sort(idx[:n_test])
    return (pack_rows(data.train_images[train], data.train_labels[train]),
            pack_rows(data.train_images[test], data.train_labels[test]))


@lru_cache(maxsize=4)
def public_rows(cfg: RunConfig) -> torch.Tensor:
    data = load_images(cfg)
    public, _ = public_and_pool(cfg)
    return pack_rows(data.train_images[public], data.train_labels[public])


def balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded order of the images in which the classes take turns (the first image of every
    class in a random permutation, then the second of every class, ...), so every prefix is
    class-balanced (to within one image per class while every class has images left)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # how many images of its class come before it
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return order[np.argsort(rank[order], kind="stable")]


REFERENCE_SEED = 0  # the real reference does not change with the run's seed: scores compare


@lru_cache(maxsize=4)
def global_test_rows(cfg: RunConfig) -> torch.Tensor:
    """The server's real reference for KID and FID: ``image.real-feature-images`` images of the
    test split (no client trains on it), class-balanced, in a fixed seeded order
    (:func:`balanced_order`): the same images for every run, so their cached features serve all."""
    data = load_images(cfg)
    n = cfg.image.real_feature_images
    if n > len(data.test_labels):
        raise ConfigError(f"run-config key 'image.real-feature-images' = {n}: the test split of "
                          f"{cfg.data.dataset!r} has only {len(data.test_labels)} images")
    order = balanced_order(data.test_labels, REFERENCE_SEED)[:n]
    return pack_rows(data.test_images[order], data.test_labels[order])


# --------------------------------------------------------------------------- a device's own images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DATASET_CLASSES = {"fashion-mnist": FASHION_CLASSES, "cifar10": CIFAR10_CLASSES}


def _image_files(root: Path, dataset: str) -> list[tuple[int, Path]]:
    """(label, file) of every image in an ImageFolder layout: ``root/<class>/...`` where <class>
    is one of the dataset's class names or its index (e.g. ``sneaker`` or ``7``)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data-path {root} is not a folder")
    names = DATASET_CLASSES[dataset]
    files = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name in names:
            label = names.index(folder.name)
        elif folder.name.isdigit() and int(folder.name) < len(names):
            label = int(folder.name)
        else:
            raise ValueError(f"data-path {root}: class folder {folder.name!r} is neither a class of "
                             f"{dataset!r} ({', '.join(names)}) nor its index 0-{len(names) - 1}")
        files += [(label, f) for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"data-path {root} holds no class folders of PNG/JPEG images "
                                "(root/<class name or index>/*.png)")
    return files


def _read_image(path: Path, dataset: str) -> np.ndarray:
    """One image file as the dataset's (C, 32, 32) uint8 example: Fashion-MNIST's grayscale
    28x28 with the 2-pixel black border of the federation's data, CIFAR-10's RGB 32x32."""
    from PIL import Image

    with Image.open(path) as img:
        if dataset == "fashion-mnist":
            pixels = np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR))
            return np.pad(pixels, 2)[None]
        return np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)).transpose(2, 0, 1)


def local_image_rows(cfg: RunConfig, data_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, local-test rows) of a device's own images (``data-path``: class folders).

    An image goes to the local test set when a hash of (seed, its path under data-path) falls
    below ``test-fraction``, as the text task's documents do: deterministic, and adding an image
    never moves the others between train and test. Both sets get at least one image.
    """
    root = Path(data_path).expanduser()
    files = _image_files(root, cfg.data.dataset)
    train, test = [], []
    for label, file in files:
        digest = hashlib.sha1(f"{cfg.seed}:{file.relative_to(root)}".encode()).digest()
        bucket = test if int.from_bytes(digest[:8], "big") / 2**64 < cfg.data.test_fraction else train
        bucket.append((label, file))
    if not train and len(test) > 1:
        train.append(test.pop())
    if not test and len(train) > 1:
        test.append(train.pop())
    if not train or not test:
        raise ValueError(f"data-path {root}: {len(files)} image(s); need at least two")

    def rows(items):
        return pack_rows(np.stack([_read_image(f, cfg.data.dataset) for _, f in items]),
                         np.array([label for label, _ in items], dtype=np.int64))

    return rows(train), rows(test)


def own_image_rows(cfg: RunConfig, data_path: str, cache_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """local_image_rows, decoded once into ``cache_folder`` (again when an image is added,
    removed or changed)."""
    root = Path(data_path).expanduser()
    files = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
             for _, f in _image_files(root, cfg.data.dataset)]
    key = ["images", str(root), files, cfg.data.dataset, cfg.seed, cfg.data.test_fraction]
    return cached_blocks(cache_folder, key, lambda: local_image_rows(cfg, data_path))
