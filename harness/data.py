"""CIFAR-10/100 as uint8 tensors: load the python batches, split, subset, augment on the device.

The whole dataset fits in memory (150 MB as uint8), so it lives on the training device as one
tensor and each batch is cropped, flipped and normalized there in one go, as in airbench:
no per-image PIL work and no DataLoader workers competing with training for the CPU.
"""

from __future__ import annotations

import hashlib
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.config import DATA_DIR_ENV, DataConfig
from harness.errors import HarnessError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)

LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


class DatasetError(HarnessError, RuntimeError):
    """Missing or unreadable data; the message is one line naming the file or the fix."""


@dataclass
class Dataset:
    """A whole dataset as arrays: images (n, 3, 32, 32) uint8, labels int64."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    digest: str  # content digest of all four arrays: tells copies of a dataset apart
    coarse_classes: list[str] | None = None  # cifar100: the 20 superclasses
    fine_to_coarse: np.ndarray | None = None  # cifar100: superclass of each fine class


def _read_pickle(path: Path) -> dict:
    """Read one python-layout batch; keys come back as str whether pickled by py2 or py3."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DatasetError(f"missing data file {path}: re-download the dataset into that folder") from None
    except Exception as e:
        raise DatasetError(
            f"corrupt or truncated data file {path} ({type(e).__name__}): delete it and download the dataset again"
        ) from None
    if not isinstance(d, dict):
        raise DatasetError(f"corrupt data file {path}: expected a pickled dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batches(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, dict]:
    images, labels = [], {}
    for name in names:
        path = folder / name
        d = _read_pickle(path)
        try:
            data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            for key in (label_key, "coarse_labels"):
                if key in d:
                    labels.setdefault(key, []).append(np.asarray(d[key], dtype=np.int64))
        except (KeyError, ValueError) as e:
            raise DatasetError(f"corrupt data file {path}: bad or missing field ({e})") from None
        if len(labels[label_key][-1]) != len(data):
            raise DatasetError(f"corrupt data file {path}: {len(data)} images but {len(labels[label_key][-1])} labels")
        images.append(data)
    return np.concatenate(images), {k: np.concatenate(v) for k, v in labels.items()}


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))  # (no copy of a contiguous array)
    return h.hexdigest()[:16]


def _download(name: str, root: Path) -> None:
    """Fetch a dataset with torchvision; offline, fail with one line that names every way out."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        cls(str(root), train=True, download=True)
    except Exception as e:
        raise DatasetError(
            f"{name} not found under {root} and the download failed ({type(e).__name__}): "
            f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a folder holding "
            f"{LAYOUTS[name]['folder']}/, or download {LAYOUTS[name]['url']} and extract it there"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 from `cfg.root` in the standard python layout.

    Reads the pickled batches directly rather than through torchvision's checksum check, so a
    re-encoded copy still loads; the digest records which copy a run used.
    """
    layout = LAYOUTS[cfg.dataset]
    root = Path(cfg.root).expanduser()
    folder = root / layout["folder"]
    if not (folder / layout["meta"]).exists():
        if not cfg.download:
            raise DatasetError(
                f"{cfg.dataset} not found: no {folder}/; pass --data-dir DIR (or set "
                f"{DATA_DIR_ENV}) to a folder holding {layout['folder']}/, or download "
                f"{layout['url']} and extract it there"
            )
        _download(cfg.dataset, root)
    meta = _read_pickle(folder / layout["meta"])
    if cfg.dataset == "cifar10":
        train_x, train_l = _read_batches(folder, layout["train"], "labels")
        test_x, test_l = _read_batches(folder, layout["test"], "labels")
        classes = list(meta["label_names"])
        ds = Dataset(cfg.dataset, train_x, train_l["labels"], test_x, test_l["labels"], classes, "")
    else:
        train_x, train_l = _read_batches(folder, layout["train"], "fine_labels")
        test_x, test_l = _read_batches(folder, layout["test"], "fine_labels")
        fine, coarse = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
        fine_to_coarse = np.zeros(len(fine), dtype=np.int64)
        fine_to_coarse[train_l["fine_labels"]] = train_l["coarse_labels"]
        key = "fine_labels" if cfg.label == "fine" else "coarse_labels"
        ds = Dataset(
            cfg.dataset,
            train_x,
            train_l[key],
            test_x,
            test_l[key],
            fine if cfg.label == "fine" else coarse,
            "",
            coarse,
            fine_to_coarse,
        )
    ds.digest = digest(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    return ds


@dataclass
class Splits:
    """Train/validation/test tensors on the training device (images uint8, labels int64)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of the training set into (train, validation) indices."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def _put(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def test_split(ds: Dataset, cfg: DataConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels a run is evaluated on: the first `test_subset` (all by default)."""
    return _put(ds.test_images[: cfg.test_subset], device), _put(ds.test_labels[: cfg.test_subset], device)


def make_splits(ds: Dataset, cfg: DataConfig, device: torch.device | str = "cpu") -> Splits:
    train_idx, val_idx = split_indices(len(ds.train_labels), cfg.val_fraction, cfg.split_seed)
    train_idx, val_idx = train_idx[: cfg.train_subset], val_idx[: cfg.val_subset]
    return Splits(
        _put(ds.train_images[train_idx], device),
        _put(ds.train_labels[train_idx], device),
        _put(ds.train_images[val_idx], device),
        _put(ds.train_labels[val_idx], device),
        *test_split(ds, cfg, device),
        ds.classes,
    )


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, for a whole uint8 batch at once.

    The randomness comes from `generator`, which lives on the batch's device, so a training
    step never waits for the host. Each image gets its own offset (dy, dx) and flip; one
    gather builds the batch, with the column order reversed for flipped images so crop and
    flip cost a single indexing pass. The gather writes channels-last memory (an NCHW view
    of an NHWC tensor): the batch's one layout change, which channels-last models want anyway.
    """
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), device=x.device, generator=generator)
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[0, :, None] + ar_h  # (b, h)
    cols = offsets[1, :, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (b, w)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2)


def make_normalize(device: torch.device | str, channels_last: bool = False):
    """uint8 batch -> float batch normalized by the CIFAR-10 channel statistics, in the memory
    format the model wants (a no-op for a batch `augment` made, when channels-last)."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - mean) / std).contiguous(memory_format=fmt)

    return normalize
