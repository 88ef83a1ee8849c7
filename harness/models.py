"""A configurable CNN family with named stages and a replaceable classifier head.

    image -> [stem] -> stage1 -> stage2 -> ... -> embedding ([pool], flatten, [fc, act]) -> classifier (dropout, fc)

Each stage is `convs_per_stage` conv(-BN)-activation layers (optionally with a residual
shortcut), then 2x pooling and dropout, so stage k's output is (width_k, 32/2^k, 32/2^k).
With `pool_first` the pooling comes right after the stage's first conv instead, so the
others run on a quarter of the pixels (airbench's layout). The optional stem is a fixed
2x2 patch-whitening conv whose filters come from the training images (`whiten_stem`).
The named stages let analysis read features at any depth and transfer freeze the first k;
`replace_head` swaps the classifier for a new label set.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from harness.config import ModelConfig

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def make_pool(cfg: ModelConfig) -> nn.Module:
    return nn.MaxPool2d(2) if cfg.pool == "max" else nn.AvgPool2d(2)


class ConvBlock(nn.Module):
    """`n` conv layers; with `residual`, their output is added to a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, cfg: ModelConfig):
        super().__init__()
        layers = []
        for i in range(cfg.convs_per_stage):
            layers.append(
                nn.Conv2d(
                    c_in if i == 0 else c_out,
                    c_out,
                    cfg.kernel_size,
                    padding=cfg.kernel_size // 2,
                    bias=not cfg.batch_norm,
                )
            )
            if cfg.pool_first and i == 0:
                layers.append(make_pool(cfg))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            if not (cfg.residual and i == cfg.convs_per_stage - 1):
                layers.append(ACTIVATIONS[cfg.activation]())
        self.convs = nn.Sequential(*layers)
        self.shortcut = None
        if cfg.residual:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
            if cfg.pool_first:
                self.shortcut = nn.Sequential(self.shortcut, make_pool(cfg))
            self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return self.convs(x)
        return self.act(self.convs(x) + self.shortcut(x))


def make_stage(c_in: int, c_out: int, cfg: ModelConfig) -> nn.Sequential:
    pool = nn.Identity() if cfg.pool_first else make_pool(cfg)  # (keeps the state-dict keys alike)
    return nn.Sequential(OrderedDict(block=ConvBlock(c_in, c_out, cfg), pool=pool, drop=nn.Dropout(cfg.dropout)))


STEM_KERNEL = 2  # whitening stem: 2x2 patches, 12 numbers, so 24 filters (each eigenvector and its negative)
GLOBAL_POOLS = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}


class CNN(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, image_size: int = 32):
        super().__init__()
        self.cfg = cfg
        side, c_in = image_size, 3
        self.stem = None
        if cfg.stem == "whiten":
            c_in = 2 * 3 * STEM_KERNEL**2
            self.stem = nn.Sequential(nn.Conv2d(3, c_in, STEM_KERNEL, bias=False), ACTIVATIONS[cfg.activation]())
            self.stem[0].weight.requires_grad_(False)  # a fixed function of the data (see whiten_stem)
            side -= STEM_KERNEL - 1
        widths = [c_in] + list(cfg.widths)
        self.stages = nn.Sequential(
            OrderedDict((f"stage{i + 1}", make_stage(widths[i], widths[i + 1], cfg)) for i in range(len(cfg.widths)))
        )
        side = side // 2 ** len(cfg.widths)
        pool = []
        if cfg.global_pool != "none":
            pool, side = [GLOBAL_POOLS[cfg.global_pool](1)], 1
        flat = widths[-1] * side * side
        if cfg.head_width > 0:
            self.embedding = nn.Sequential(
                *pool, nn.Flatten(), nn.Linear(flat, cfg.head_width), ACTIVATIONS[cfg.activation]()
            )
            self.embedding_dim = cfg.head_width
        else:
            self.embedding = nn.Sequential(*pool, nn.Flatten()) if pool else nn.Flatten()
            self.embedding_dim = flat
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.embedding_dim, num_classes))
        self.logit_scale = cfg.logit_scale
        self.frozen: tuple[str, ...] = ()  # names of frozen submodules (see `freeze`)

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages._modules)

    @property
    def num_classes(self) -> int:
        return self.classifier[-1].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def head(self, e: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features."""
        logits = self.classifier(e)
        scale = getattr(self, "logit_scale", 1.0)  # getattr: models pickled before it existed
        return logits if scale == 1.0 else logits * scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: what the classifier head sees."""
        stem = getattr(self, "stem", None)
        return self.embedding(self.stages(stem(x) if stem is not None else x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed(x)
        return self.head(e), e

    def features(self, x: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the named stages (all by default), plus "embedding" if asked for."""
        names = names or self.stage_names
        out = {}
        if getattr(self, "stem", None) is not None:
            x = self.stem(x)
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
        if self.stem is not None and stages > 0:
            names.insert(0, "stem")
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


@torch.no_grad()
def whiten_stem(model: CNN, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Make the stem whiten the 2x2 patches of `images` (normalized, (n, 3, h, w)).

    Each filter is an eigenvector of the patches' covariance divided by the square root of its
    eigenvalue, so the stem's outputs are decorrelated with unit variance, and each comes with
    its negative so that the activation after it loses nothing. A network starting from
    whitened inputs learns much faster in its first epochs (Keller Jordan's airbench).
    """
    if model.stem is None:
        return
    conv = model.stem[0]
    k = conv.kernel_size[0]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (n, c, h', w', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(-1, images.shape[1], k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds per image of the convolutions and linear layers: what torch's FLOP counter
    counts, halved (tests/test_models.py holds them equal), from forward hooks on one image,
    since `FlopCounterMode` imports torch._dynamo on first use (1.4 s of every run's setup)."""
    macs = 0

    def count(module: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal macs  # each output element is one dot product over a weight row (conv: in/groups x k x k)
        macs += out.numel() * module.weight[0].numel()

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return macs
