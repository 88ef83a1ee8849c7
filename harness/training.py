"""The training loop: optimizer, LR schedule, early stopping, per-epoch callbacks.

`fit` knows nothing about MLflow or Optuna: it calls each callback with the epoch's metrics,
and a callback may log them, or raise (optuna.TrialPruned) to stop the run.

A training step never waits for the host: the data and the augmentation's random numbers
live on the device, and the running loss and accuracy are summed there and read once per
epoch (with progress bars, twice more), so a GPU is never left idle while Python catches up.
A non-finite loss is therefore noticed at the end of its epoch.
"""

from __future__ import annotations

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

from harness import interrupts
from harness.config import Config, ConfigError, pick
from harness.data import Splits, augment, make_normalize
from harness.errors import HarnessError
from harness.evaluation import predict
from harness.resume import TrainingState


class NonFiniteLoss(HarnessError, RuntimeError):
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
            raise ConfigError(
                f"device {name} asked for but only {torch.cuda.device_count()} CUDA device(s) "
                "exist: use --set device=cuda:0"
            )
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
        if torch.are_deterministic_algorithms_enabled():  # (turning it off imports the compiler: 1.6 s)
            torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def _sgd(groups: list[dict], cfg: Config, fused) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        fused=fused,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


# name -> optimizer from (param groups, config, fused); the names: config.CHOICES["optimizer"]
OPTIMIZERS = {
    "sgd": _sgd,
    "adam": lambda groups, cfg, fused: torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused),
    "adamw": lambda groups, cfg, fused: torch.optim.AdamW(
        groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused
    ),
}


def build_optimizer(param_groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """`param_groups` may carry an `lr_scale` (transfer: a smaller rate for the backbone).

    On CUDA the fused implementations update every parameter in one kernel (and Adam keeps its
    step count on the device), instead of a launch per parameter group of tensors."""
    make = pick(OPTIMIZERS, "optimizer", cfg.optimizer)
    groups = [{"params": list(g["params"]), "lr": cfg.lr * g.get("lr_scale", 1.0)} for g in param_groups]
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return make(groups, cfg, fused)


def _one_cycle(opt: torch.optim.Optimizer, cfg: Config, total: int, linear: bool = False):
    # linear: airbench's triangle, from lr/5 up to lr and down to lr/15. OneCycleLR divides by
    # zero on a handful of steps: give tiny runs a slightly longer cycle
    shape = {"anneal_strategy": "linear", "div_factor": 5.0, "final_div_factor": 3.0} if linear else {}
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 8), pct_start=cfg.warmup, **shape
    )


# name -> (scheduler from (optimizer, config, total steps), whether it steps every batch);
# the names: config.CHOICES["schedule"]
SCHEDULES = {
    "onecycle": (_one_cycle, True),
    "linear": (lambda opt, cfg, total: _one_cycle(opt, cfg, total, linear=True), True),
    "cosine": (lambda opt, cfg, total: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), True),
    "step": (
        lambda opt, cfg, total: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma),
        False,
    ),
    "plateau": (
        lambda opt, cfg, total: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=cfg.gamma, patience=cfg.lr_patience
        ),
        False,
    ),
    "none": (lambda opt, cfg, total: None, False),
}


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Returns (scheduler, per_batch): one-cycle, linear and cosine step every batch, the rest every epoch."""
    make, per_batch = pick(SCHEDULES, "schedule", cfg.schedule)
    return make(opt, cfg, cfg.epochs * steps_per_epoch), per_batch


class Lookahead:
    """Every `every` steps, a slow copy of the weights moves toward the fast ones and the fast
    ones restart from it (Zhang et al., 2019, as airbench schedules it: the pull grows over the
    run, so early steps train freely and the last ones average)."""

    def __init__(self, model: torch.nn.Module, total_steps: int, every: int = 5):
        self.params = [p for p in model.state_dict().values() if p.dtype.is_floating_point]
        self.slow = [p.detach().clone() for p in self.params]
        self.total, self.every = max(total_steps, 1), every

    def step(self, step: int) -> None:
        if step % self.every == 0 or step == self.total:
            decay = 1.0 if step == self.total else 0.95**5 * (step / self.total) ** 3
            torch._foreach_lerp_(self.slow, self.params, 1 - decay)
            torch._foreach_copy_(self.params, self.slow)


def fit(
    model: torch.nn.Module,
    splits: Splits,
    cfg: Config,
    device: torch.device,
    callbacks: list[Callback] = (),
    param_groups: list[dict] | None = None,
    progress: bool = True,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> FitResult:
    """Train `model` on `splits` (tensors already on `device`) and restore its best weights.

    Early stopping (and a pruner, through the callbacks) watches validation accuracy, on the first
    `data.prune_subset` validation images where set: `patience` epochs without a new best end
    training; the weights kept are scored on the whole part (`best_val_accuracy`, what a study
    selects on). A NaN/inf loss raises NonFiniteLoss at its epoch's end. Every `checkpoint_every`
    epochs `checkpoint` gets the training state (harness/resume.py); from such a state `resume`
    continues, the callbacks first called on the epochs it holds.
    """
    bf16 = use_bf16(device, cfg.precision)
    normalize = make_normalize(device, cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    state, per_batch = new_state(model, param_groups, cfg, device, math.ceil(len(splits.train_y) / cfg.batch_size))
    if resume is not None:
        state.restore(resume, EpochMetrics)
        for metrics in state.history:  # the epochs it holds, replayed to the callbacks
            for callback in callbacks:
                callback(metrics)
    watch_x, watch_y = splits.val_x[: cfg.data.prune_subset], splits.val_y[: cfg.data.prune_subset]
    stopped_early = False

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        start = time.perf_counter()
        loss, accuracy, images_per_s = train_epoch(state, step_model, splits, cfg, normalize, bf16, per_batch, progress)
        val_loss, val_accuracy = validate(model, watch_x, watch_y, normalize, bf16, cfg)
        lr, seconds = state.optimizer.param_groups[-1]["lr"], time.perf_counter() - start
        metrics = EpochMetrics(epoch, loss, accuracy, val_loss, val_accuracy, lr, images_per_s, seconds)
        if state.scheduler is not None and not per_batch:
            state.scheduler.step(val_accuracy) if cfg.schedule == "plateau" else state.scheduler.step()
        record(state, metrics)
        if progress:
            tqdm.write(summary(metrics))
        for callback in callbacks:
            callback(metrics)
        if cfg.patience and state.since_best >= cfg.patience:
            stopped_early = True
            break
        if checkpoint is not None and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs:
            checkpoint(state.capture())
        interrupts.check()  # a stop Python swallowed mid-epoch (see harness/interrupts.py) stops here

    model.load_state_dict(state.best_state)
    result = FitResult(state.history, state.best_epoch, state.best_val_accuracy, stopped_early)
    if len(watch_y) < len(splits.val_y):  # watched on a subset: the weights kept are scored on the whole part
        result.best_val_accuracy = validate(model, splits.val_x, splits.val_y, normalize, bf16, cfg)[1]
    return result


def new_state(
    model: torch.nn.Module, param_groups: list[dict] | None, cfg: Config, device: torch.device, steps_per_epoch: int
) -> tuple[TrainingState, bool]:
    """A fresh run's state, and whether its schedule steps every batch (else every epoch)."""
    opt = build_optimizer(param_groups or [{"params": model.parameters()}], cfg)
    scheduler, per_batch = build_scheduler(opt, cfg, steps_per_epoch)
    lookahead = Lookahead(model, cfg.epochs * steps_per_epoch) if cfg.lookahead else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return TrainingState(model, opt, scheduler, lookahead, gen, device), per_batch


def train_epoch(
    state: TrainingState,
    step_model: torch.nn.Module,
    splits: Splits,
    cfg: Config,
    normalize,
    bf16: bool,
    per_batch: bool,
    progress: bool,
) -> tuple[float, float, float]:
    """The epoch after `state.epoch`: one pass over the training images in a fresh order, returning
    (loss, accuracy, images per second). `step_model` is `state.model`, compiled where asked; a
    per-batch schedule steps with every batch."""
    epoch, opt, scheduler, gen = state.epoch + 1, state.optimizer, state.scheduler, state.generator
    state.model.train()
    start = time.perf_counter()
    n = len(splits.train_y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    order = torch.randperm(n, device=state.device, generator=gen)
    sums = torch.zeros(2, device=state.device)  # loss * images, correct predictions
    bar = tqdm(
        range(steps_per_epoch),
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    show_at = {steps_per_epoch // 3, 2 * steps_per_epoch // 3} - {0}  # the bar's two reads
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = normalize(augment(splits.train_x[idx], gen))
        y = splits.train_y[idx]
        with torch.autocast(device_type=state.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = step_model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None and per_batch:
            scheduler.step()
        state.steps += 1
        if state.lookahead is not None:
            state.lookahead.step(state.steps)
        sums += torch.stack([loss.detach() * len(y), (logits.detach().argmax(1) == y).sum().float()])
        if progress and step in show_at:
            seen = (step + 1) * cfg.batch_size
            loss_sum, correct = sums.tolist()  # a read for the bar
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
            )
    loss_sum, correct = sums.tolist()  # the epoch's one wait for the device
    images_per_s = n / (time.perf_counter() - start)
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(
            f"non-finite training loss ({loss_sum / n}) in epoch {epoch}: lower the learning rate (lr={cfg.lr:g})"
        )
    return loss_sum / n, correct / n, images_per_s


def record(state: TrainingState, metrics: EpochMetrics) -> None:
    """An epoch done: its metrics kept, and the weights too if they are the best yet."""
    state.epoch = metrics.epoch
    state.history.append(metrics)
    if metrics.val_accuracy > state.best_val_accuracy or state.best_state is None:
        state.best_epoch, state.best_val_accuracy = metrics.epoch, metrics.val_accuracy
        state.best_state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        state.since_best = 0
    else:
        state.since_best += 1


def summary(m: EpochMetrics) -> str:
    return (
        f"epoch {m.epoch:3d}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}"
        f"  val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f}"
        f"  lr {m.lr:.2e}  {m.images_per_s:.0f} img/s"
    )


def validate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, normalize, bf16: bool, cfg: Config
) -> tuple[float, float]:
    """(loss, accuracy) on validation images; the loss with the same label smoothing as the training
    loss, so the curves compare."""
    val = predict(model, x, normalize, batch_size=1000, bf16=bf16, tta=cfg.eval.tta)
    loss, correct = torch.stack(
        [F.cross_entropy(val.logits, y, label_smoothing=cfg.label_smoothing), (val.logits.argmax(1) == y).sum().float()]
    ).tolist()  # validation's one wait for the device
    return loss, correct / len(y)
