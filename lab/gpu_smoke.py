"""The GPU smoke test: what a user with one or more CUDA GPUs runs first (meant to take under 5
minutes; not yet run: no GPU was lent to this work).

    python -m lab.gpu_smoke [--out DIR]

1. the sanity stream on CUDA in bf16 (a short stream: every code path, not the calibrated numbers);
2. the same on two ranks with NCCL, when two GPUs are there (each rank on its own GPU, evaluation shared);
3. lab/bench.py at LLaVA-7B's shapes in bf16 (12,288 tokens, d = 4096, E = 6, r = 128);
4. the peak memory of two LLaVA-7B decoder layers with PASs adapters (E = 6, r = 128), one sequence of 1,536
   tokens forward and backward in bf16, against engine/memory.py's estimate for the same.
Each step prints its result; DIR/smoke.json keeps them (the README quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHORT = [
    "--n-train",
    "64",
    "--n-test",
    "32",
    "--epochs",
    "1",
    "--order",
    "numglue,art,OCR",
    "--dtype",
    "bfloat16",
    "--device",
    "cuda",
    "--tiny-pretrain-steps",
    "300",
    "--eval",
    "diag-last",
]


def step(name: str, cmd: list[str], env: dict | None = None) -> dict:
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    print(f"[{name}] exit {done.returncode} in {time.time() - start:.0f} s")
    print(done.stdout[-1500:] if done.returncode == 0 else done.stderr[-3000:])
    return {"exit": done.returncode, "seconds": round(time.time() - start, 1), "tail": done.stdout[-600:]}


def decoder_layers_peak(layers: int = 2, tokens: int = 1536) -> dict:
    """Measured peak of `layers` 7B decoder layers with adapters, forward and backward, against the plan."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    import llava_wrap
    from engine import memory
    from pasmoe import PASsConfig, inject
    from pasmoe_fused import FusedPASsMoELinear

    text = llava_wrap.llava_15_7b_config().text_config
    text._attn_implementation = "sdpa"
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stack = torch.nn.ModuleList(LlamaDecoderLayer(text, i) for i in range(layers)).to("cuda", torch.bfloat16)
    inject(stack, PASsConfig(num_experts=6, rank=128, alpha=256.0), layer_class=FusedPASsMoELinear)
    x = torch.randn(1, tokens, text.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos_sin = LlamaRotaryEmbedding(text).to("cuda")(x, torch.arange(tokens, device="cuda").unsqueeze(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = x
        for layer in stack:
            h = layer(h, position_embeddings=cos_sin, attention_mask=None)
            h = h[0] if isinstance(h, tuple) else h
    h.float().square().mean().backward()
    torch.cuda.synchronize()
    measured = (torch.cuda.max_memory_allocated() - base) / memory.GIB
    params = sum(p.numel() * p.element_size() for p in stack.parameters())
    trained = sum(p.numel() for p in stack.parameters() if p.requires_grad)
    model = torch.nn.ModuleDict({"layers": stack})
    text.num_hidden_layers = layers
    acts = memory.plan(model, text, memory.Setting(1, False, 1, tokens, False, 1, 1, 0))["activations"]
    planned = (params + 4 * trained) / memory.GIB + acts  # weights, gradients, activations (no optimizer here)
    print(f"[7B decoder layers x{layers}, E=6, r=128, {tokens} tokens] peak {measured:.2f} GiB, plan {planned:.2f} GiB")
    return {"measured_GiB": round(measured, 3), "planned_GiB": round(planned, 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where smoke.json goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this is the GPU smoke test")
    out = args.out or Path(tempfile.mkdtemp(prefix="pasmoe-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    found = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    cache = ["--cache-dir", str(out / "cache")]
    found["stream_1_gpu"] = step(
        "sanity stream, 1 GPU, bf16", [sys.executable, "train_stream.py", *SHORT, *cache, "--out", str(out / "one")]
    )
    if torch.cuda.device_count() >= 2:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        found["stream_2_gpus_nccl"] = step(
            "sanity stream, 2 ranks, NCCL",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                "train_stream.py",
                *SHORT,
                *cache,
                "--out",
                str(out / "two"),
            ],
            env,
        )
    found["bench_7b_shapes"] = step(
        "bench, 7B shapes, bf16",
        [
            sys.executable,
            "-m",
            "lab.bench",
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--shapes",
            "12288x4096x6x128",
            "--repeats",
            "10",
        ],
    )
    found["decoder_layers"] = decoder_layers_peak()
    (out / "smoke.json").write_text(json.dumps(found, indent=1))
    print(f"written to {out / 'smoke.json'}")


if __name__ == "__main__":
    main()
