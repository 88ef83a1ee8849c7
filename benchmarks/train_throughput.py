"""Training throughput: the harness loop against a seed-style loop, same model, data and device.

    python benchmarks/train_throughput.py --data-dir data [--images 10000] [--device auto]
    python benchmarks/train_throughput.py --data-dir data --config fast --numerics

Seed style: torchvision PIL transforms per image (RandomCrop(32, padding=4), flip, ToTensor,
Normalize) in a DataLoader with batch 64 and 2 workers. Harness: `harness.training.fit` with
the uint8 dataset on the device and batched augmentation, at batch 64 (like for like) and at
the config's batch size. Prints images/s for each and their ratio.

`--numerics` times `fit` alone at the config's batch size in each precision and memory layout,
and with `torch.compile` (its compile time shows in the first epoch's seconds): which of them pays
on this device.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from harness import config as C
from harness.data import MEAN, STD, load_dataset, make_splits
from harness.models import build_model
from harness.recipes import config_path
from harness.training import build_optimizer, fit, select_device


class PILDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: a PIL image through the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images = images.transpose(0, 2, 3, 1)  # HWC like torchvision's CIFAR10.data
        self.labels = labels
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def seed_style(cfg: C.Config, images, labels, device, warmup_batches: int = 5) -> float:
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        PILDataset(images, labels, transform),
        batch_size=64,
        shuffle=True,
        num_workers=2,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    model = build_model(cfg.model, 10).to(device)
    opt = build_optimizer([{"params": model.parameters()}], cfg)
    model.train()
    seen, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == warmup_batches:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seen, start = 0, time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def harness_loop(cfg: C.Config, splits, device, batch_size: int, **settings) -> tuple[float, float]:
    """Images/s of the second epoch (warm caches, compiled kernels) and the first epoch's seconds."""
    cfg = C.replace(cfg, {"batch_size": batch_size, "epochs": 2, "patience": 0, **settings})
    model = build_model(cfg.model, 10).to(device)
    result = fit(model, splits, cfg, device, progress=False)
    return result.history[-1].images_per_s, result.history[0].epoch_seconds


NUMERICS = {  # --numerics: name -> config settings
    "fp32, NCHW": {"precision": "fp32", "channels_last": False},
    "fp32, channels-last": {"precision": "fp32", "channels_last": True},
    "bf16 autocast, channels-last": {"precision": "bf16", "channels_last": True},
    "bf16 autocast, channels-last, torch.compile": {"precision": "bf16", "channels_last": True, "compile": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--images", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", default=None, help="a config name or file (default: the default config)")
    parser.add_argument("--numerics", action="store_true", help="precision, layout and compile side by side")
    args = parser.parse_args()

    cfg = C.load(
        config_path(args.config),
        [f"device={args.device}", f"data.train_subset={args.images}", "data.val_subset=1000"],
        args.data_dir,
    )
    device = select_device(cfg.device)
    ds = load_dataset(cfg.data)
    splits = make_splits(ds, cfg.data, device)
    cpu_x, cpu_y = splits.train_x.cpu().numpy(), splits.train_y.cpu().numpy()
    print(
        f"device {device}, {len(cpu_y)} images, model widths {cfg.model.widths}, torch threads "
        f"{torch.get_num_threads()}"
    )
    if args.numerics:
        rows = [
            (name, *harness_loop(cfg, splits, device, cfg.batch_size, **settings))
            for name, settings in NUMERICS.items()
        ]
    else:
        rows = [("seed-style (PIL + DataLoader, batch 64, 2 workers)", seed_style(cfg, cpu_x, cpu_y, device), None)]
        rows.append(("harness (batched on-device augmentation, batch 64)", *harness_loop(cfg, splits, device, 64)))
        own = harness_loop(cfg, splits, device, cfg.batch_size)
        rows.append((f"harness ({cfg.name} config, batch {cfg.batch_size})", *own))
    base = rows[0][1]
    print(f"{'loop':<56}{'images/s':>10}{'ratio':>8}{'epoch 1 s':>11}")
    for name, ips, first in rows:
        first = "-" if first is None else f"{first:.1f}"  # (the seed-style loop times no epoch)
        print(f"{name:<56}{ips:>10.0f}{ips / base:>8.2f}{first:>11}")


if __name__ == "__main__":
    main()
