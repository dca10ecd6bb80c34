"""What every training loop of the project shares: the schedule, the optimizer step, the step log."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.processes import rank_world


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps to `peak`, then a cosine decay to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, lr: float, clip_norm: float | None) -> None:
    """Set the learning rate, clip the gradients' global norm, step, and drop the gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StepLog:
    """Per-step log values kept on the device and fetched 25 steps at a time (no host sync per step);
    a non-finite loss stops the run in every process at the same step."""

    def __init__(self, write: Callable[[dict], None], where: str, bar):
        self.write, self.where, self.bar, self.pending = write, where, bar, []

    def add(self, record: dict, values: dict[str, torch.Tensor]) -> None:
        self.pending.append((record, list(values), torch.stack(list(values.values()))))
        if len(self.pending) == 25:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows = torch.stack([v for _, _, v in self.pending])
        bad = (~torch.isfinite(rows[:, 0])).int()
        if rank_world()[1] > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        for (record, names, _), row, stop in zip(self.pending, rows.tolist(), bad.tolist()):
            if stop:
                raise FloatingPointError(
                    f"non-finite loss (here {row[0]}) in {self.where} at step {record['step']}: the "
                    "last finished task's checkpoint is intact; lower --lr or check the data, then --resume"
                )
            self.write(record | dict(zip(names, row)))
        self.bar.set_postfix(loss=f"{rows[-1, 1].item():.3f}")
        self.pending.clear()
