"""Helpers shared by the tests (kept here, so no test depends on bench.py)."""

import torch
import torch.nn.functional as F
from torch import nn


class PlainLoRA(nn.Module):
    """One LoRA of a given rank on a frozen Linear: the memory baseline for the PASs layer."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, **kw) / base.in_features**0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, **kw) * 0.01)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward, parameters and the input excluded."""
    skip = {p.data_ptr() for p in module.parameters()} | {x.data_ptr()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(seen.values())


def only_read(argv: list[str]) -> list[str]:
    """A list of test flags, shared by many methods, without the flags that its --method does not read
    (train_stream refuses those)."""
    import config

    given = {k: argv[argv.index(f"--{k}") + 1] for k in ("method", "stream", "model") if f"--{k}" in argv}
    unread = {k for k, (read, _) in config.read_by(config.RunConfig(**given)).items() if not read}
    groups, i = [], 0  # a flag with its value, or a switch alone
    while i < len(argv):
        takes = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        groups.append(argv[i : i + 1 + takes])
        i += 1 + takes
    return [a for group in groups if group[0][2:].replace("-", "_") not in unread for a in group]
