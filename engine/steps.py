"""What every training loop of the project shares: the schedule, the optimizer step, the step log."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.processes import local, rank_world


def seed_everything(seed: int) -> None:
    """Python's and torch's generators (what the data order, the adapters' init and dropout draw from)."""
    random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps to `peak`, then a cosine decay to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def clip_sharded(params: list, clip_norm: float) -> None:
    """clip_grad_norm_ over FSDP2's sharded gradients together with the whole ones: the squares of the shards
    summed over the ranks, the whole gradients' (the same on every rank) counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    shards = torch.stack([local(g).float().square().sum() for g in grads if hasattr(g, "to_local")]).sum()
    dist.all_reduce(shards)
    whole = sum((g.float().square().sum() for g in grads if not hasattr(g, "to_local")), torch.zeros(()))
    scale = (clip_norm / ((shards + whole.to(shards.device)).sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        local(g).mul_(scale.to(local(g).dtype))


def micro_batches(batch: list, rank: int, world: int, size: int | None) -> list[tuple[list, float]]:
    """This rank's part of a global batch (every world-th item) as micro-batches of at most `size` items,
    each with its share of the part (the shares sum to 1). Every rank gets the same number of micro-batches,
    so that DDP and FSDP2 see their collectives in step; where a rank's part is too short to fill one, that
    micro-batch is its first item with share 0 (the loop masks its labels: it contributes nothing). With
    global batch B and world W the step is the same as one process on the whole batch, for any W <= B."""
    part = batch[rank::world]
    count = max(1, math.ceil(math.ceil(len(batch) / world) / size)) if size else 1
    splits = [part[i * len(part) // count : (i + 1) * len(part) // count] for i in range(count)]
    return [(items, len(items) / len(part)) if items else (part[:1], 0.0) for items in splits]


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, lr: float, clip_norm: float | None) -> None:
    """Set the learning rate, clip the gradients' global norm, step, and drop the gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if clip_norm and any(hasattr(p, "to_local") for p in params):
        clip_sharded(params, clip_norm)
    elif clip_norm:
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
