"""The training loop: optimizer, LR schedule, early stopping, per-epoch callbacks.

`fit` knows nothing about MLflow or Optuna: it calls each callback with the epoch's metrics,
and a callback may log them, or raise (optuna.TrialPruned) to stop the run.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.config import Config, ConfigError
from harness.data import Splits, augment, make_normalize
from harness.evaluation import predict


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; usually a learning rate that is too high."""


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    images_per_s: float
    epoch_seconds: float

    def as_dict(self) -> dict[str, float]:
        d = dict(vars(self))
        d.pop("epoch")
        return d


@dataclass
class FitResult:
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


Callback = Callable[[EpochMetrics], None]


def select_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or exactly the device asked for."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"bad value {name!r} for device: choose one of auto, cpu, cuda, cuda:N, mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {name} asked for but CUDA is not available: use --set device=cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {name} asked for but only {torch.cuda.device_count()} CUDA device(s) "
                              "exist: use --set device=cuda:0")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device {name} asked for but MPS is not available: use --set device=cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX); elsewhere bf16 on the CPU is emulated and slow."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, precision: str) -> bool:
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return precision == "bf16"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def build_optimizer(param_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """`param_groups` may carry an `lr_scale` (transfer: a smaller rate for the backbone)."""
    groups = [{"params": g["params"], "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in param_groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Returns (scheduler, per_batch): one-cycle and cosine step every batch, the rest every epoch."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        # OneCycleLR divides by zero on a handful of steps: give tiny runs a slightly longer cycle
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=max(total, 8),
                                                   pct_start=0.25), True
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), True
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma), False
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.gamma,
                                                          patience=max(1, cfg.patience // 2)), False
    return None, False


def fit(model: torch.nn.Module, splits: Splits, cfg: Config, device: torch.device,
        callbacks: list[Callback] = (), param_groups: list[dict] | None = None,
        progress: bool = True) -> FitResult:
    """Train `model` on `splits` (tensors already on `device`) and restore its best weights.

    Early stopping watches validation accuracy; `patience` epochs without a new best end
    training. Raises NonFiniteLoss as soon as a batch loss is NaN/inf.
    """
    cuda = device.type == "cuda"
    bf16 = use_bf16(device, cfg.precision)
    channels_last = cfg.channels_last
    normalize = make_normalize(device, channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    opt = build_optimizer(param_groups or [{"params": model.parameters()}], cfg)
    n = len(splits.train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    scheduler, per_batch = build_scheduler(opt, cfg, steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = FitResult()
    best_state = None
    since_best = 0

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                   leave=False, disable=not progress, dynamic_ncols=True)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = normalize(augment(splits.train_x[idx], gen))
            y = splits.train_y[idx]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite training loss ({loss.item()}) at epoch {epoch}, "
                                    f"batch {step + 1}: lower the learning rate (lr={cfg.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None and per_batch:
                scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            if progress and (step % 20 == 0 or step == steps_per_epoch - 1):
                seen = min((step + 1) * cfg.batch_size, n)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if cuda:
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - start
        val = predict(model, splits.val_x, normalize, batch_size=1000, bf16=bf16)
        val_y = splits.val_y.cpu()
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum.item() / n,
            train_accuracy=correct.item() / n,
            val_loss=F.cross_entropy(val.logits, val_y).item(),
            val_accuracy=(val.logits.argmax(1) == val_y).float().mean().item(),
            lr=opt.param_groups[-1]["lr"],
            images_per_s=n / train_seconds,
            epoch_seconds=time.perf_counter() - start,
        )
        if scheduler is not None and not per_batch:
            scheduler.step(metrics.val_accuracy) if cfg.schedule == "plateau" else scheduler.step()
        result.history.append(metrics)
        if progress:
            tqdm.write(f"epoch {epoch:3d}  train loss {metrics.train_loss:.4f} acc {metrics.train_accuracy:.4f}"
                       f"  val loss {metrics.val_loss:.4f} acc {metrics.val_accuracy:.4f}"
                       f"  lr {metrics.lr:.2e}  {metrics.images_per_s:.0f} img/s")
        if metrics.val_accuracy > result.best_val_accuracy or best_state is None:
            result.best_epoch, result.best_val_accuracy = epoch, metrics.val_accuracy
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
        for callback in callbacks:
            callback(metrics)
        if cfg.patience and since_best >= cfg.patience:
            result.stopped_early = True
            break

    model.load_state_dict(best_state)
    return result
