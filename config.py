"""A run's settings and everything that can be known before it trains: every flag with its help and allowed
values, the paper's recipe, the tasks and the model with the method's adapters that the settings build,
and the checks that stop a bad run before it loads its weights.

    RunConfig           one field per flag (engine.flags.flag: default, help, range); a method's own flags
                        are declared with the method (baselines.Spec.flags) and kept in method_args
    adapters(cfg)       the PASs layers' config and class for the chosen method
    load_tasks, load_model   the stream's tasks; the base model with the method's adapters
    check_stream        every image decodes, every prompt fits (before the first step)
    memory_plan         the memory per GPU, counted on the meta device; dry_run prints it (--dry-run)
    parse_args          the command line: flags, the recipe preset, --resume, every check, one line each
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

import data
import llava_wrap
from baselines import METHODS
from engine import memory
from engine.flags import Parser, add_flags, dataclass_flags, flag
from engine.processes import is_main
from engine.steps import seed_everything
from pasmoe import PASsConfig
from toy import sanity, tiny_llava

PAPER_RECIPE = dict(
    num_experts=6,
    rank=128,
    alpha=256.0,
    lr=2e-5,
    epochs=3,
    batch_size=12,
    max_length=1536,
    dtype="bfloat16",
    seed=42,
    eval="diag-last",
    max_new_tokens=512,
    mixture_scale="paper",
    eval_batch_size=16,  # ours: generation's KV cache at 16 x 2048 tokens is 16 GiB (48 would be 48 GiB)
)


@dataclass
class RunConfig:
    # what runs, on what
    method: str = flag("pasmoe", "the method: pasmoe (the paper's) or one of baselines.METHODS", choices=tuple(METHODS))
    stream: str = flag(
        "sanity",
        "sanity: seven small tasks built in, offline; ctbench: MLLM-CTBench files",
        choices=("sanity", "ctbench"),
    )
    data_root: str | None = flag(None, "ctbench: the folder holding reasoning_train/ and reasoning_test/")
    image_root: str | None = flag(
        None, "ctbench: where the records' image paths start (default: DATA_ROOT/images if it exists, else DATA_ROOT)"
    )
    model: str = flag("tiny", "tiny (a small LLaVA-1.5 pretrained here, cached) or a LLaVA-1.5 folder or hub name")
    cache_dir: str = flag("cache", "tiny: where the pretrained tiny base is cached")
    tiny_pretrain_steps: int = flag(2500, "tiny: pretraining steps of the tiny base (part of its cache key)", min=1)
    order: str = flag("A", "task order: A (the paper's), B (its reverse), C, D (ours), or comma-separated task keys")
    # the adapters (pasmoe.PASsConfig)
    num_experts: int = flag(6, "E, experts per layer (seqlora and its kin: one LoRA of rank E * rank)", min=1)
    rank: int = flag(4, "rank r of each expert (the adapters have rank E x r in all)", min=1)
    total_rank: int | None = flag(None, "instead of --rank: a total rank split over the experts", min=1)
    alpha: float = flag(8.0, "LoRA alpha of one expert at --mixture-scale paper (scaling alpha / rank)", above=0)
    mixture_scale: str = flag(
        "matched",
        "matched: each expert at alpha x E, so a uniform gate equals the reference "
        "LoRA of rank E x rank; paper: alpha per expert (DESIGN.md 1)",
        choices=("matched", "paper"),
    )
    dropout: float = flag(0.0, "dropout on the adapters' input", min=0, max=0.99)
    temperature: float = flag(1.0, "tau of the gate's softmax (1: the paper's Eq. 7)", above=0)
    lambda_a: float = flag(5e-4, "Eq. 11, A rows (paper 5.1)", min=0)
    lambda_b: float = flag(5e-5, "Eq. 11, B columns (paper 5.1; its 5.3.2 prefers 2.5e-4)", min=0)
    weight_clip: float = flag(10.0, "c in w = clip(I_agg / mean, 0, c) (the authors' benchmark code)", above=0)
    importance_tokens: str = flag(
        "all", "Eq. 9's tokens: all attended ones, text (no image tokens) or answer", choices=("all", "text", "answer")
    )
    train_projector: bool = flag(False, "also train the vision-language projector (the paper trains adapters only)")
    # training
    lr: float = flag(1.5e-3, "peak learning rate of each task (the sanity stream's calibrated setting)", above=0)
    epochs: int = flag(4, "passes over a task's training items", min=1)
    batch_size: int = flag(8, "global batch: split over the processes, and into micro-batches", min=1)
    micro_batch_size: int | None = flag(
        None,
        "sequences per forward on one GPU; the global batch is reached by accumulating gradients "
        "(default: all of this GPU's part of a batch at once)",
        min=1,
    )
    warmup_ratio: float = flag(0.03, "share of each task's steps spent warming up", min=0, max=1)
    weight_decay: float = flag(0.0, "AdamW's weight decay", min=0)
    clip_norm: float = flag(1.0, "gradient clipping (global norm)", above=0)
    max_length: int = flag(256, "training sequences are cut at this many tokens (counted and reported)", min=2)
    dtype: str = flag(
        "float32", "the base's dtype; adapters stay fp32 under bf16 autocast", choices=("float32", "bfloat16")
    )
    gradient_checkpointing: bool = flag(False, "recompute activations in backward (less memory, more time)")
    # data and evaluation
    n_train: int = flag(320, "sanity: training items per task", min=1)
    n_test: int = flag(192, "sanity: test items per task (a binomial SE of about 3 points at 80%)", min=1)
    limit: int | None = flag(None, "keep the first N training and N test items of each task (a smoke run)", min=1)
    eval: str = flag(
        "full",
        "full: every seen task after every task; diag-last: the new one, and all at the end",
        choices=("full", "diag-last"),
    )
    eval_batch_size: int = flag(48, "prompts per generation batch", min=1)
    max_new_tokens: int = flag(32, "generation budget per answer", min=1)
    probe_size: int = flag(8, "test items per task whose gates are kept for the router-drift analysis", min=1)
    # the engine, and the memory plan
    shard: bool = flag(
        False,
        "FSDP2: decoder layers and LM head sharded over the GPUs (seqft, ewc, mas, seqlora, replay, joint): "
        "what seqft needs on any GPU, and the others on GPUs too small for DDP",
    )
    dry_run: bool = flag(
        False,
        "check the data, build the model on the meta device (no weights read), print the "
        "memory per GPU, and stop: exit 0 if it fits, 1 with the flag to change if not",
    )
    gpus: int | None = flag(None, "--dry-run: plan for this many GPUs (default: the processes of this run)", min=1)
    gpu_memory: float | None = flag(
        None, "--dry-run: plan for GPUs of this many GiB, as torch reports them (default: this GPU's)", above=0
    )
    keep_checkpoints: str = flag(
        "all",
        "all: every task's checkpoint (the analyses read them); last: only the newest (what --resume needs)",
        choices=("all", "last"),
    )
    # the run
    device: str | None = flag(None, "cpu or cuda (default: cuda if available)")
    seed: int = flag(0, "seeds the adapters' init, the data order and the method's draws", min=0)
    recipe: str | None = flag(None, "paper: LLaVA-1.5-7B's settings under any flag given", choices=("paper",))
    out: str | None = flag(None, "run directory (default: runs/<time>-<method>-s<seed>)")
    method_args: dict = dataclasses.field(default_factory=dict)  # the method's own flags (baselines.Spec.flags)


def adapters(cfg: RunConfig) -> tuple[PASsConfig, object] | None:
    """The PASs layers' config and class of this method; None for the methods without adapters."""
    spec = METHODS[cfg.method]
    if spec.adapters is None:
        return None
    E, r = cfg.num_experts, cfg.total_rank // cfg.num_experts if cfg.total_rank else cfg.rank
    alpha = cfg.alpha * E if cfg.mixture_scale == "matched" else cfg.alpha  # DESIGN.md 1, the mixture's scale
    if spec.adapters == "one":  # one LoRA of the same total rank, at the scaling alpha / r of one expert
        E, r, alpha = 1, E * r, cfg.alpha * E
    elif spec.adapters == "per-task":  # one expert per task, the same total rank split, scaling alpha / r
        T = len(data.task_order(cfg.order))
        E, r, alpha = T, E * r // T, cfg.alpha / r * (E * r // T)
    pas = PASsConfig(
        num_experts=E,
        rank=r,
        alpha=alpha,
        dropout=cfg.dropout,
        temperature=cfg.temperature,
        lambda_a=cfg.lambda_a,
        lambda_b=cfg.lambda_b,
        weight_clip=cfg.weight_clip,
        stabilize=spec.stabilize,
    )
    given = cfg.method_args | {"seed": cfg.seed}
    return pas, partial(spec.layer, **{name: given[name] for name in spec.layer_args})


# ---- what the settings build, and whether it fits ----


def load_tasks(cfg: RunConfig) -> list[data.Task]:
    """The stream's tasks in training order; --limit keeps the first N items of each split."""
    if cfg.stream == "sanity":
        tasks = sanity.sanity_stream(cfg.seed, cfg.order, cfg.n_train, cfg.n_test)
    else:
        tasks = data.load_ctbench(cfg.data_root, cfg.order, cfg.image_root)
    return [data.Task(t.key, t.train[: cfg.limit], t.test[: cfg.limit]) for t in tasks]


def load_model(cfg: RunConfig, device: torch.device) -> llava_wrap.LlavaBundle:
    """The base (the tiny one is built once by rank 0 and cached), then the method's adapters."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if cfg.model == "tiny" and device.type == "meta":  # shapes only: the memory plan
        with torch.device("meta"):
            bundle = tiny_llava.tiny_llava(tiny_llava.TinyConfig(pretrain_steps=cfg.tiny_pretrain_steps))
    elif cfg.model == "tiny":
        if not is_main():
            dist.barrier()  # rank 0 builds an uncached base; the others then load it
        bundle = tiny_llava.pretrained_tiny(
            cfg.cache_dir, tiny_llava.TinyConfig(pretrain_steps=cfg.tiny_pretrain_steps)
        )
        if is_main() and dist.is_initialized():
            dist.barrier()
        bundle.model.to(device=device, dtype=dtype)
    else:
        bundle = llava_wrap.load_llava(cfg.model, dtype=dtype, device=device)
    seed_everything(cfg.seed)  # the adapters' init: the same on every path and every rank
    if (built := adapters(cfg)) is None:  # no adapters: the method unfreezes or adds what it trains
        bundle.model.requires_grad_(False)
    else:
        llava_wrap.add_adapters(
            bundle.model, built[0], layer_class=built[1], train_projector=cfg.train_projector, verbose=is_main()
        )
    if cfg.gradient_checkpointing:
        bundle.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return bundle


def memory_plan(cfg: RunConfig, tasks: list, world: int, device: torch.device | None) -> tuple[dict, str]:
    """The memory per GPU of this run (engine.memory), counted on the model built on the meta device, and
    what to change if it does not fit this GPU (device) or GPUs of --gpu-memory GiB."""
    bundle = load_model(cfg, torch.device("meta"))
    spec = METHODS[cfg.method]
    spec.cls.setup_model(bundle.model)
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    longest = max(collate.length(ex)[0] for t in tasks for ex in t.test)
    setting = memory.Setting(
        world,
        cfg.shard,
        cfg.micro_batch_size or -(-cfg.batch_size // world),
        cfg.max_length,
        cfg.gradient_checkpointing,
        cfg.eval_batch_size,
        longest + cfg.max_new_tokens,
        spec.state_copies,
    )
    text = bundle.model.config.text_config
    rows = memory.plan(bundle.model, text, setting)
    rows["one task checkpoint"] = memory.checkpoint_bytes(bundle.model, spec.saved_copies) / memory.GIB
    capacity = (
        cfg.gpu_memory * memory.GIB
        if cfg.gpu_memory
        else device and torch.cuda.get_device_properties(device).total_memory
    )
    return rows, memory.advice(bundle.model, text, setting, capacity, spec.shardable) if capacity else ""


def check_stream(cfg: RunConfig, tasks, bundle, collate) -> dict | data.DataError:
    """Before the first step: every image decodes, every prompt fits (data.check_stream)."""
    roots = (Path(cfg.image_root), Path(cfg.data_root)) if cfg.stream == "ctbench" else None
    context = bundle.model.config.text_config.max_position_embeddings
    try:
        return data.check_stream(tasks, collate, cfg.max_length, context, cfg.max_new_tokens, roots)
    except data.DataError as err:
        hint = (
            "\n  (--stream ctbench without --recipe paper trains with the sanity stream's --max-length "
            f"{cfg.max_length}; --recipe paper sets the paper's, 1536)"
            if cfg.stream == "ctbench" and not cfg.recipe
            else ""
        )
        return data.DataError(f"{err}{hint}")


def dry_run(cfg: RunConfig) -> int:
    """--dry-run: the data checked and the memory per GPU planned on the meta device, no weight read.
    Returns the exit code: 0 if the run fits (or no GPU size is known), 1 if not."""
    tasks = load_tasks(cfg)
    world, device = cfg.gpus or int(os.environ.get("WORLD_SIZE", 1)), None
    if torch.cuda.is_available() and not cfg.gpu_memory:
        device = torch.device("cuda", torch.cuda.current_device())
    bundle = load_model(cfg, torch.device("meta"))
    if (
        problem := check_stream(
            cfg, tasks, bundle, data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
        )
    ) and isinstance(problem, Exception):
        raise problem
    rows, too_big = memory_plan(cfg, tasks, world, device)
    engine = "FSDP2" if cfg.shard else "DDP" if world > 1 else "one process"
    print(f"{cfg.method} on {world} GPU(s), {engine}: memory per GPU")
    print("\n".join(f"  {what:<44} {gib:8.2f} GiB" for what, gib in rows.items()))
    print(
        f"does not fit: {too_big}"
        if too_big
        else "fits"
        if device or cfg.gpu_memory
        else "no GPU here: --gpu-memory GIB checks a size"
    )
    return 1 if too_big else 0


# ---- the command line: every flag checked before anything loads ----


def parse_args(argv=None) -> tuple[RunConfig, bool]:
    """(the run's config, whether it resumes a run). A bad flag stops here, in one line, with exit 2."""
    parser = Parser(description="Continual training of LLaVA-1.5 with PASs-MoE and its baselines (--help: every flag)")
    parser.add_argument("--resume", type=Path, help="continue the run in this directory after its last finished task")
    flags, types = dataclass_flags(RunConfig)
    add_flags(parser, flags, types)
    for name, spec in METHODS.items():
        add_flags(parser.add_argument_group(f"--method {name}"), spec.flags) if spec.flags else None
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "resume" in given:
        return resumed(parser, given.pop("resume"), given), True
    preset = dict(PAPER_RECIPE) if given.get("recipe") == "paper" else {}
    if preset and "alpha" not in given and {"rank", "total_rank"} & set(given):  # keep the recipe's alpha / r = 2
        E = given.get("num_experts", preset["num_experts"])
        preset["alpha"] = 2.0 * (given["total_rank"] // E if "total_rank" in given else given["rank"])
    own = {k: f for spec in METHODS.values() for k, f in spec.flags.items()}
    cfg = RunConfig(**(preset | {k: v for k, v in given.items() if k not in own}))
    cfg.method_args = {k: given.get(k, f.default) for k, f in METHODS[cfg.method].flags.items()}
    cfg.out = cfg.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}-{cfg.method}-s{cfg.seed}"
    if cfg.stream == "ctbench" and cfg.data_root and not cfg.image_root:  # saved as resolved
        cfg.image_root = str(data.default_image_root(cfg.data_root))
    if problems := settings_problems(cfg, given, flags | own):
        parser.error("; ".join(problems))
    return cfg, False


def read_by(cfg: RunConfig) -> dict[str, tuple[bool, str]]:
    """The flags that only some settings read: for each, (does this run read it, what reads it)."""
    spec = METHODS[cfg.method]
    mixing = "a method that mixes experts (pasmoe, pas-rw, pasmoe-random, l2, moelora, moelora-topk)"
    stabilized = "a method with Eq. 11 (pasmoe, pasmoe-random, l2)"
    return {
        **dict.fromkeys(("data_root", "image_root"), (cfg.stream == "ctbench", "--stream ctbench")),
        **dict.fromkeys(("n_train", "n_test"), (cfg.stream == "sanity", "--stream sanity")),
        **dict.fromkeys(("cache_dir", "tiny_pretrain_steps"), (cfg.model == "tiny", "--model tiny")),
        **dict.fromkeys(
            ("num_experts", "rank", "total_rank", "alpha", "dropout", "importance_tokens", "train_projector"),
            (spec.adapters is not None, "a method with adapters (not seqft or l2p)"),
        ),
        **dict.fromkeys(("temperature", "mixture_scale", "probe_size"), (spec.adapters == "mixture", mixing)),
        **dict.fromkeys(("lambda_a", "lambda_b", "weight_clip"), (spec.stabilize, stabilized)),
        **{k: (name == cfg.method, f"--method {name}") for name, other in METHODS.items() for k in other.flags},
        **dict.fromkeys(("gpus", "gpu_memory"), (cfg.dry_run, "--dry-run")),
    }


def settings_problems(cfg: RunConfig, given: dict, flags: dict) -> list[str]:
    """Every problem with the settings that can be known before anything loads, each naming what to change."""
    spec, dashed = METHODS[cfg.method], lambda k: "--" + k.replace("_", "-")
    problems = [f"{dashed(k)} {v} {why}" for k, v in given.items() if k in flags and (why := flags[k].problem(v))]
    problems += [
        f"{dashed(k)} does nothing in this run: it is read by {what}"
        for k, (read, what) in read_by(cfg).items()
        if k in given and not read
    ]
    try:
        T = len(data.task_order(cfg.order))
    except ValueError as err:
        T = 7
        problems.append(
            f"--order {cfg.order}: {err}; A, B, C and D are whole orders, a custom one is task keys "
            "joined by commas (e.g. --order numglue,art)"
        )
    total = cfg.total_rank or cfg.num_experts * cfg.rank
    if "rank" in given and "total_rank" in given:
        problems.append("--rank and --total-rank both given: give one")
    elif cfg.total_rank and cfg.total_rank % cfg.num_experts:
        problems.append(f"--total-rank {cfg.total_rank} does not split over {cfg.num_experts} experts (--num-experts)")
    if cfg.method_args.get("top_k", 0) > cfg.num_experts:
        problems.append(
            f"--top-k {cfg.method_args['top_k']} is more than the {cfg.num_experts} experts (--num-experts)"
        )
    if spec.adapters == "per-task" and total < T or cfg.method == "olora" and total // T < 1:
        problems.append(f"{cfg.method} gives each of {T} tasks its own ranks: raise --rank (total now {total})")
    if cfg.method == "olora" and cfg.weight_decay:
        problems.append("olora needs --weight-decay 0: AdamW's decay would shrink the frozen slices of old tasks")
    if cfg.stream == "ctbench" and not (cfg.data_root and Path(cfg.data_root).is_dir()):
        problems.append(
            "--stream ctbench needs --data-root DIR, an existing folder (check it: python data.py check DIR)"
        )
    if cfg.recipe == "paper" and cfg.model == "tiny":
        problems.append("--recipe paper is LLaVA-1.5-7B's: add --model llava-hf/llava-1.5-7b-hf (or a local copy)")
    if Path(cfg.out).exists() and not cfg.dry_run:
        problems.append(f"--out {cfg.out} exists: choose another, or --resume it")
    return problems + process_problems(cfg)


def process_problems(cfg: RunConfig) -> list[str]:
    """What the processes of torchrun and --shard refuse."""
    problems = []
    if cfg.batch_size < int(os.environ.get("WORLD_SIZE", 1)):
        problems.append(f"--batch-size {cfg.batch_size} is smaller than the {os.environ['WORLD_SIZE']} processes")
    if cfg.shard and "RANK" not in os.environ and not cfg.dry_run:
        problems.append(
            "--shard splits the model over the processes of torchrun: run it with torchrun, or plan "
            "it with --dry-run --gpus N"
        )
    if cfg.shard and cfg.train_projector:
        problems.append(
            "--shard keeps the projector whole on every rank; it trains no projector (drop --train-projector)"
        )
    if cfg.shard and not METHODS[cfg.method].shardable:
        shardable = ", ".join(name for name, other in METHODS.items() if other.shardable)
        problems.append(f"--shard: {cfg.method} runs under DDP only (its memory: --dry-run); sharded: {shardable}")
    return problems


# What may change when a run is resumed: a path (it may move between attempts) and what only changes how
# fast or in what memory the run goes (after an out-of-memory, say); the config.json records the new values.
RESUME_MAY_CHANGE = ("image_root", "eval_batch_size", "micro_batch_size", "gradient_checkpointing", "keep_checkpoints")


def resumed(parser, path: Path, given: dict) -> RunConfig:
    """The saved config of the run in `path`, with the flags of RESUME_MAY_CHANGE that were given."""
    if fixed := [k for k in given if k not in RESUME_MAY_CHANGE]:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
        parser.error(
            f"--resume takes the run's saved config (only {may} may change); drop "
            f"{', '.join('--' + k.replace('_', '-') for k in fixed)}"
        )
    if not (path / "config.json").is_file():
        parser.error(f"--resume {path}: no config.json there (is it a run directory of train_stream.py?)")
    saved = json.loads((path / "config.json").read_text())
    cfg = RunConfig(**{f.name: saved[f.name] for f in dataclasses.fields(RunConfig) if f.name in saved})
    cfg = dataclasses.replace(cfg, out=str(path), **given)
    if problems := settings_problems(
        dataclasses.replace(cfg, out=str(path / "x" / "x")), given, dataclass_flags(RunConfig)[0]
    ):
        parser.error("; ".join(problems))
    return cfg
