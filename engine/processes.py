"""torchrun's processes: the device of each rank, the process group, and the one check of torch.distributed."""

from __future__ import annotations

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
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
