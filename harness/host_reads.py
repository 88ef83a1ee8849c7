"""Count the tensor calls that make the host wait for the device, e.g. around `fit`.

On a GPU, `loss.item()`, `if torch.isfinite(loss):`, `.cpu()` or a copy of a CPU tensor to the
device each stall Python until the GPU catches up, and a small network then trains at the
speed of the host. These calls are invisible in the code's shape, so the training loop's
promise (no read per step) is kept by counting them:

    with HostReads() as reads:
        fit(model, splits, cfg, device)
    reads.total, reads.counts   # e.g. 2 per epoch: {"tolist": 2}
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts reads of device values (`item`, `__bool__`, `tolist`, `cpu`, `numpy`, ...) and
    blocking copies of CPU tensors (`.to(device)` without `non_blocking=True`)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counts[name] += 1
        elif name == "to" and _copies_to_a_device(args, kwargs):
            self.counts["to"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _copies_to_a_device(args, kwargs) -> bool:
    """`cpu_tensor.to(device)`, blocking: a dtype-only `.to` copies nothing across."""
    tensor = args[0] if args else None
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or kwargs.get("non_blocking"):
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(
        isinstance(t, (str, torch.device)) or (isinstance(t, torch.Tensor) and t.device.type != "cpu") for t in targets
    )
