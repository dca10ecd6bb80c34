"""RECIPE_7B.md's table: for every method of the paper's Table 1 at LLaVA-1.5-7B with the paper's recipe, the
trainable parameters, the memory per GPU on 1 GPU and on 8 under DDP and FSDP2, the smallest of 80 and 96 GB
GPUs that holds it, and one task checkpoint. Counted by engine/memory.py on the model built on the meta device with
llava-1.5-7b-hf's configuration: arithmetic, not a measurement (lab/gpu_smoke.py measures).

    python -m lab.recipe                      print the table
    python -m lab.recipe --docs RECIPE_7B.md  and write it into the file's <!-- recipe table --> block
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

import config
import llava_wrap
from baselines import METHODS
from engine import memory

LENGTH, NEW_TOKENS = 1536, 512  # the recipe's --max-length and --max-new-tokens; prompts as long as allowed
CHECKPOINTING = True  # the recipe's command uses --gradient-checkpointing


def meta_model(method: str) -> tuple[torch.nn.Module, float]:
    """The 7B with this method's adapters and trainable parts, on the meta device; its state copies."""
    from transformers import LlavaForConditionalGeneration

    cfg, _ = config.parse_args(["--recipe", "paper", "--model", "llava-hf/llava-1.5-7b-hf", "--method", method])
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_wrap.llava_15_7b_config()).to(torch.bfloat16)
    if (built := config.adapters(cfg)) is None:
        model.requires_grad_(False)
    else:
        llava_wrap.add_adapters(model, built[0], layer_class=built[1], verbose=False)
    METHODS[method].cls.setup_model(model)
    return model, METHODS[method].state_copies


def smallest_gpu(peak: float) -> int | None:
    """The smallest of the two GPU sizes (GB) that holds this peak (GiB per GPU), leaving CUDA its margin;
    None if neither does."""
    return next((gb for gb in (80, 96) if peak <= memory.ALLOCATOR_MARGIN * gb), None)  # sizes taken as GiB


def fits(peak: float) -> str:
    gb = smallest_gpu(peak)
    return f"{peak:.1f} (fits {gb} GB)" if gb else f"{peak:.1f} (fits neither)"


def table() -> str:
    rows = [
        "| method | trained parameters | 1 GPU: GiB | 8 GPUs, DDP: GiB per GPU | 8 GPUs, FSDP2: GiB per GPU | "
        "one task checkpoint | add to the recipe's command |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, spec in METHODS.items():
        if method in ("pasmoe-random", "l2", "pas-rw", "moelora-topk"):  # as pasmoe or moelora, to the gigabyte
            continue
        model, copies = meta_model(method)
        text, peaks = model.config.text_config, []
        for world, shard in ((1, False), (8, False), (8, True)):
            setting = memory.Setting(world, shard, 1, LENGTH, CHECKPOINTING, 16, LENGTH + NEW_TOKENS, copies)
            peaks.append(memory.plan(model, text, setting)["peak"] if spec.shardable or not shard else None)
        cells = [fits(peak) if peak is not None else "-" for peak in peaks]
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ddp_too_big = smallest_gpu(peaks[1]) != 80  # 8 GPUs of 80 GB under DDP do not hold it
        flags = f"--method {method}" + (" --shard" if ddp_too_big and spec.shardable else "")
        rows.append(
            f"| {method} | {trained / 1e9:.2f} B | {' | '.join(cells)} | "
            f"{memory.checkpoint_bytes(model, spec.saved_copies) / memory.GIB:.1f} GiB | `{flags}` |"
        )
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=None, help="write the table into this file's recipe block")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.docs:
        block = re.compile(r"(<!-- recipe table -->\n).*?(<!-- end of recipe table -->)", re.S)
        found, count = block.subn(lambda m: m.group(1) + text + m.group(2), args.docs.read_text())
        if not count:
            raise ValueError(f"{args.docs} has no <!-- recipe table --> block")
        args.docs.write_text(found)


if __name__ == "__main__":
    main()
