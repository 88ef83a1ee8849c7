"""A configurable CNN family with named stages and a replaceable classifier head.

    image -> stage1 -> stage2 -> ... -> embedding (flatten, fc, act) -> classifier (dropout, fc)

Each stage is `convs_per_stage` conv(-BN)-activation layers (optionally with a residual
shortcut), then 2x pooling and dropout, so stage k's output is (width_k, 32/2^k, 32/2^k).
The named stages let analysis read features at any depth and transfer freeze the first k;
`replace_head` swaps the classifier for a new label set.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from harness.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class ConvBlock(nn.Module):
    """`n` conv layers; with `residual`, their output is added to a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, cfg: ModelConfig):
        super().__init__()
        layers = []
        for i in range(cfg.convs_per_stage):
            layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, cfg.kernel_size,
                                    padding=cfg.kernel_size // 2, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            if not (cfg.residual and i == cfg.convs_per_stage - 1):
                layers.append(ACTIVATIONS[cfg.activation]())
        self.convs = nn.Sequential(*layers)
        self.shortcut = None
        if cfg.residual:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
            self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.convs(x)
        return self.act(self.convs(x) + self.shortcut(x))


def make_stage(c_in: int, c_out: int, cfg: ModelConfig) -> nn.Sequential:
    pool = nn.MaxPool2d(2) if cfg.pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(OrderedDict(block=ConvBlock(c_in, c_out, cfg), pool=pool,
                                     drop=nn.Dropout(cfg.dropout)))


class CNN(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, image_size: int = 32):
        super().__init__()
        self.cfg = cfg
        widths = [3] + list(cfg.widths)
        self.stages = nn.Sequential(OrderedDict(
            (f"stage{i + 1}", make_stage(widths[i], widths[i + 1], cfg)) for i in range(len(cfg.widths))))
        side = image_size // 2 ** len(cfg.widths)
        flat = widths[-1] * side * side
        if cfg.head_width > 0:
            self.embedding = nn.Sequential(nn.Flatten(), nn.Linear(flat, cfg.head_width),
                                           ACTIVATIONS[cfg.activation]())
            self.embedding_dim = cfg.head_width
        else:
            self.embedding = nn.Flatten()
            self.embedding_dim = flat
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.embedding_dim, num_classes))
        self.frozen: tuple[str, ...] = ()  # names of frozen submodules (see `freeze`)

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages._modules)

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(self.stages(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: what the classifier head sees."""
        return self.embedding(self.stages(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return self.classifier(e), e

    def features(self, x: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the named stages (all by default), plus "embedding" if asked for."""
        names = names or self.stage_names
        out = {}
        for name, stage in self.stages.named_children():
            x = stage(x)
            if name in names:
                out[name] = x
        if "embedding" in names:
            out["embedding"] = self.embedding(x)
        return out

    def freeze(self, stages: int, embedding: bool = False) -> list[str]:
        """Freeze the first `stages` stages (and the embedding layer): a fixed feature extractor.

        Their parameters stop requiring gradients (leave them out of the optimizer: see
        `trainable_parameters`), and `train()` keeps them in eval mode, so BatchNorm running
        statistics and dropout inside them stay as in the source model while the rest trains.
        Returns the frozen submodules' names.
        """
        if not 0 <= stages <= len(self.stages):
            raise ValueError(f"cannot freeze {stages} stages: the model has {len(self.stages)}")
        for name in self.frozen:  # a new freeze replaces the last one
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(True)
        names = [f"stages.{n}" for n in self.stage_names[:stages]] + (["embedding"] if embedding else [])
        for name in names:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        self.frozen = tuple(names)
        self.train(self.training)
        return names

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "CNN":
        super().train(mode)
        for name in getattr(self, "frozen", ()):  # getattr: models pickled before `frozen` existed
            self.get_submodule(name).eval()
        return self

    def replace_head(self, num_classes: int) -> None:
        """A fresh classifier for a new label set (transfer); the embedding layer is kept."""
        old = self.classifier[-1]
        self.classifier[-1] = nn.Linear(self.embedding_dim, num_classes).to(old.weight.device)


def build_model(cfg: ModelConfig, num_classes: int) -> CNN:
    return CNN(cfg, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds per image, from torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2
