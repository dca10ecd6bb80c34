"""Speed and memory, as ratios against baselines measured in the same run.

    python -m lab.bench                   the layer: CPU, float32, the default shapes
    python -m lab.bench --device cuda --dtype bfloat16 --shapes 12288x4096x6x128
    python -m lab.bench --whole-run       whole short streams of moelora, pasmoe, seqlora
    python -m lab.bench --against DIR     `python train_stream.py` here and in checkout DIR

The layer in its two forms, pasmoe.py's plain autograd ("plain") and pasmoe_fused.py's hand-written
backward passes ("fused", what training uses), on the same frozen nn.Linear and tokens, against:
    lora      one plain LoRA of the same total rank E*r (the cost PASs-MoE should match)
    loop      MoE-LoRA as commonly written: a Python loop over experts, each expert's
              full-width output B_e A_e h multiplied by its gate (the CoIN pattern)
Reported: median fwd+bwd time over --repeats, bytes saved for backward (activations only,
parameters excluded), and the cost of importance tracking on a forward.

Whole runs (subprocesses of train_stream.py, interleaved round by round, so that drift in the
machine's speed hits every variant alike): training and evaluation seconds as each run's
state.json records them, medians over --rounds, as ratios to moelora (the paper's Table 3
compares PASs-MoE's times with MoELoRA's). --against times the default job of two checkouts
the same way (wall seconds of the whole process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pasmoe import PASsConfig, PASsMoELinear, track_importance
from pasmoe_fused import FusedPASsMoELinear

ROOT = Path(__file__).resolve().parent.parent


class PlainLoRA(nn.Module):
    """One LoRA of a given rank on a frozen Linear: the baseline of time and memory."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, **kw) / base.in_features**0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, **kw) * 0.01)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)


class LoopMoELoRA(nn.Module):
    """The common public pattern: one module per expert, gate applied to d_out-wide outputs."""

    def __init__(self, base: nn.Linear, experts: int, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.router = nn.Linear(base.in_features, experts, bias=False, **kw)
        self.A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False, **kw) for _ in range(experts))
        self.B = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False, **kw) for _ in range(experts))

    def forward(self, x):
        gate = torch.softmax(self.router(x), dim=-1)
        out = self.base(x)
        for e, (A, B) in enumerate(zip(self.A, self.B)):
            out = out + gate[..., e : e + 1] * B(A(x))
        return out


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


def median_times(fns: dict, repeats: int, device) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds so that
    drift in the machine's speed hits every variant alike."""

    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_shape(n, d, E, r, device, dtype, repeats):
    torch.manual_seed(0)
    base = nn.Linear(d, d, device=device, dtype=dtype)
    cfg = PASsConfig(num_experts=E, rank=r, adapter_dtype=None)  # the same dtype as the LoRA
    plain, fused = PASsMoELinear(base, cfg), FusedPASsMoELinear(base, cfg)
    with torch.no_grad():
        plain.lora_B.normal_(std=0.01)
        fused.load_state_dict(plain.state_dict())
    layers = {"plain": plain, "fused": fused, "lora": PlainLoRA(base, E * r), "loop": LoopMoELoRA(base, E, r)}
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)

    def step(module):
        def fn():
            module(x).float().sum().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None

        return fn

    times = median_times({k: step(m) for k, m in layers.items()}, repeats, device)
    mem = {k: saved_bytes(m, x) for k, m in layers.items()}
    xs = x.detach()
    mask = torch.ones(n, dtype=torch.bool, device=device)

    @torch.no_grad()
    def plain_forward():
        fused(xs)

    @torch.no_grad()
    def tracked_forward():
        with track_importance(fused, token_mask=mask):
            fused(xs)

    fwd = median_times({"plain": plain_forward, "tracked": tracked_forward}, repeats, device)
    return times, mem, fwd["plain"], fwd["tracked"]


SHORT_STREAM = ["--n-train", "96", "--n-test", "24", "--epochs", "2", "--eval", "full"]  # 7 tasks, 12 steps each


def whole_runs(rounds: int, extra: list[str]) -> dict:
    """Median train and eval seconds of short streams of moelora, pasmoe and seqlora."""
    methods = ("moelora", "pasmoe", "seqlora")
    seconds = {m: {"train": [], "eval": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for m in methods:
                out = Path(tmp) / f"{m}-{r}"
                cmd = [sys.executable, "train_stream.py", *SHORT_STREAM, *extra, "--method", m, "--out", str(out)]
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
                state = json.loads((out / "state.json").read_text())
                seconds[m]["train"].append(sum(state["train_s"]))
                seconds[m]["eval"].append(sum(state["eval_s"]))
    return {m: {k: statistics.median(v) for k, v in s.items()} for m, s in seconds.items()}


def against(other: Path, rounds: int, extra: list[str]) -> dict:
    """Wall seconds of `python train_stream.py` (plus `extra` flags) in this checkout and in `other`, alternated."""
    here = ROOT
    walls = {"here": [], "there": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, where in (("there", other), ("here", here)):
                cmd = [
                    sys.executable,
                    "train_stream.py",
                    *extra,
                    "--out",
                    str(Path(tmp) / f"{name}-{r}"),
                    "--cache-dir",
                    str(here / "cache"),
                ]
                start = time.perf_counter()
                subprocess.run(
                    cmd, cwd=where, check=True, capture_output=True, env=os.environ | {"PYTHONPATH": str(where)}
                )
                walls[name].append(time.perf_counter() - start)
    return walls


def layer_table(args) -> None:
    """The layer against a LoRA and a per-expert loop, one row per shape (a markdown table)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {device}, {args.dtype}, {threads} threads, median of {args.repeats}")
    print(
        "| N x d x E x r | LoRA(E*r) fwd+bwd ms | plain / LoRA | fused / LoRA | loop / fused "
        "| saved: plain / LoRA | fused / LoRA | loop / fused | tracking overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, d, E, r = map(int, shape.split("x"))
        t, m, fwd, fwd_tracked = bench_shape(n, d, E, r, device, dtype, args.repeats)
        print(
            f"| {shape} | {1e3 * t['lora']:.2f} | {t['plain'] / t['lora']:.3f} | {t['fused'] / t['lora']:.3f} "
            f"| {t['loop'] / t['fused']:.2f} | {m['plain'] / m['lora']:.2f} | {m['fused'] / m['lora']:.2f} "
            f"| {m['loop'] / m['fused']:.1f} | {100 * (fwd_tracked / fwd - 1):+.1f}% |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["2048x1024x6x16", "2048x256x6x8"],
        help="tokens x features x experts x rank-per-expert (d_in = d_out)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--whole-run", action="store_true", help="time whole short streams of moelora, pasmoe, seqlora")
    parser.add_argument(
        "--against", type=Path, default=None, help="time the default job here and in this other checkout"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="whole runs: rounds of interleaved runs (medians reported)"
    )
    parser.add_argument(
        "--run-args", default="", help='whole runs: flags for every train_stream.py run, e.g. "--n-test 48"'
    )
    args = parser.parse_args(argv)
    if args.whole_run:
        found = whole_runs(args.rounds, ["--device", args.device, *args.run_args.split()])
        ref = found["moelora"]
        print(
            f"whole short streams ({' '.join(SHORT_STREAM)}), {args.device}, median of {args.rounds} interleaved rounds"
        )
        print("| method | train s | eval s | train / moelora | eval / moelora |\n|---|---|---|---|---|")
        for m, s in found.items():
            ratios = f"{s['train'] / ref['train']:.3f} | {s['eval'] / ref['eval']:.3f}"
            print(f"| {m} | {s['train']:.1f} | {s['eval']:.1f} | {ratios} |")
        return
    if args.against:
        walls = against(args.against, args.rounds, args.run_args.split())
        here, there = statistics.median(walls["here"]), statistics.median(walls["there"])
        print(
            f"python train_stream.py {args.run_args}, median wall of {args.rounds} alternated runs: "
            f"{args.against} {there:.1f} s, this checkout {here:.1f} s: {here / there:.2f}x"
        )
        print("all runs (s):", {k: [round(v, 1) for v in vs] for k, vs in walls.items()})
        return
    layer_table(args)


if __name__ == "__main__":
    main()
