"""torchrun's processes: the device of each rank, the process group, the two engines (DDP, which keeps a
whole model on every GPU, and FSDP2, which shards it), and what every rank must do together.

    init_processes         each rank's device, set before the first collective, then the process group
    data_parallel, shard   DDP, or FSDP2 (fully_shard), which shards what DDP keeps whole on every GPU
    gradient_sync          DDP's no_sync on all but the last micro-batch of a step
    finish_gradients       averaging the gradients of what FSDP2 keeps whole on every rank
    lockstep, gather       the same number of forwards on every rank (FSDP2 gathers weights in each);
                           objects collected from every rank, in rank order
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def init_processes(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun each rank takes its own GPU before the first
    collective: otherwise every rank's NCCL calls run on GPU 0 and the first barrier fails."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=2),
            device_id=device if device.type == "cuda" else None,
        )
    return *rank_world(), device


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP without a buffer broadcast each step: the continual state (anchors, importance) is the same on
    every rank after end_task, and at LLaVA-7B, E = 6, r = 128, the anchors alone are 7 GiB. (torch 2.13
    names the switch forward_sync_buffers and deprecates broadcast_buffers.)"""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy (7 GiB at E = 6, r = 128)
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **{no_sync: False},
    )


def shard(model: torch.nn.Module, layers: list[torch.nn.Module], whole: list[torch.nn.Module], bf16: bool):
    """FSDP2 in place: each of `layers` (the decoder layers and the LM head) its own unit of parameters sharded
    over the processes, the rest of the model the root unit; the modules of `whole` stay whole on every rank
    (the vision tower, the token embeddings and the projector: they run before the language model's forward,
    which FSDP2 requires to come first; finish_gradients averages their gradients). bf16: weights are
    gathered and computed in bf16 while the sharded master weights and gradient reductions stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (rank_world()[1],))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # the root resharded after its forward too: after a no-grad pass (evaluation) it would otherwise keep its
    # parameters gathered, and an optimizer built then would hold the gathered copies, not the sharded ones
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=policy,
        reshard_after_forward=True,
        ignored_params={p for m in whole for p in m.parameters()},
    )
    model.whole_params = [p for m in whole for p in m.parameters() if p.requires_grad]
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "whole_params")


def gradient_sync(model: torch.nn.Module, last: bool):
    """Around a micro-batch's backward: DDP all-reduces only on the last micro-batch of a step (gradients
    accumulate locally before). FSDP2 reduce-scatters every micro-batch into sharded gradients, which is
    what keeps its memory low."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def finish_gradients(model: torch.nn.Module) -> None:
    """Under FSDP2: average the gradients of the parameters kept whole on every rank, as DDP would."""
    world = rank_world()[1]
    for p in getattr(model, "whole_params", []):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def lockstep(items: list, rank: int, world: int) -> list:
    """This rank's items, every world-th, padded to the same count on every rank with None (a pass that only
    keeps FSDP2's collectives in step: its result is dropped)."""
    mine = items[rank::world]
    return mine + [None] * (-(-len(items) // world) - len(mine))


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from sharded ones, on the CPU (every rank must call it: FSDP2's shards are gathered),
    one tensor at a time, so that a GPU never holds more than one whole tensor of it."""
    return {k: v.full_tensor().cpu() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


def gather(value) -> list:
    """`value` of every rank, in rank order (one process: [value])."""
    if rank_world()[1] == 1:
        return [value]
    out = [None] * rank_world()[1]
    dist.all_gather_object(out, value)
    return out
