"""The continual stream: train on tasks in order, evaluate after each, report forgetting.

    python train_stream.py                                  pasmoe on the offline sanity stream (CPU)
    python train_stream.py --method moelora --seed 1        a baseline
    python train_stream.py --recipe paper --stream ctbench --data-root DIR \\
        --model llava-hf/llava-1.5-7b-hf                    the paper's 7B recipe
    torchrun --nproc_per_node=8 train_stream.py ...         data parallel (DDP)
    python train_stream.py --resume runs/RUN                continue after the last finished task

Per task: begin_task (fresh AdamW, cosine schedule with warmup), epochs of
    loss = task loss + the method's extra terms        (pasmoe: Eq. 11; baselines.py)
then a no-grad statistics pass over the task's training data with the parameters that end
the task (pasmoe.track_importance; Eq. 9), end_task (Eq. 10, anchors), a checkpoint, and
evaluation on the tasks seen so far. Each task reseeds from (seed, task index), so a run
resumed from a task checkpoint repeats an uninterrupted run exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import evaluate
import llava_wrap
from baselines import METHODS, answer_logits
from pasmoe import PASsConfig, end_task, pas_layers, track_importance

# The paper's LLaVA-1.5-7B recipe: E=6, r=128, alpha=256 and lr=2e-5 from
# the benchmark code, 3 epochs, batch 12, max length 1536, bf16, seed 42.
PAPER_RECIPE = dict(num_experts=6, rank=128, alpha=256.0, lr=2e-5, epochs=3, batch_size=12, max_length=1536,
                    dtype="bfloat16", seed=42, eval="diag-last", max_new_tokens=512)


@dataclass
class RunConfig:
    method: str = "pasmoe"  # one of baselines.METHODS
    stream: str = "sanity"  # "sanity" (offline, built in) or "ctbench" (files under data_root)
    data_root: str | None = None  # MLLM-CTBench root holding reasoning_train/ and reasoning_test/
    image_root: str | None = None  # where the benchmark's image paths start (default: DATA_ROOT/images if it exists, else DATA_ROOT)
    model: str = "tiny"  # "tiny" (pretrained tiny LLaVA, cached) or a LLaVA-1.5 path / hub name
    cache_dir: str = "cache"  # where the tiny base is cached
    tiny_pretrain_steps: int = 2500  # pretraining steps of the tiny base (part of its cache key)
    order: str = "A"  # "A", "B" (reverse), "C", "D" (ours, data.ORDERS) or comma-separated task keys
    num_experts: int = 6  # E (seqlora: 1 expert of rank num_experts * rank)
    rank: int = 4  # rank per expert
    total_rank: int | None = None  # if set, split across experts: rank = total_rank // num_experts
    alpha: float = 8.0  # LoRA alpha (scaling alpha / rank)
    dropout: float = 0.0
    top_k: int = 2  # moelora-topk
    temperature: float = 1.0
    lambda_a: float = 5e-4  # paper section 5.1
    lambda_b: float = 5e-5  # paper section 5.1 (section 5.3.2 prefers 2.5e-4)
    weight_clip: float = 10.0
    replay_fraction: float = 0.1  # replay: share of each finished task's training items kept in the buffer
    ewc_lambda: float = 3e7  # ewc: lambda of (lambda/2) sum F (theta - theta*)^2 (DESIGN.md, section 7: how it was set)
    ewc_gamma: float = 1.0  # ewc, mas: F <- gamma F + F_t (1: sum over tasks; < 1: online EWC)
    mas_lambda: float = 1.0  # mas: lambda (Aljundi et al. 2018)
    lwf_lambda: float = 1.0  # lwf: weight of the distillation term (Li and Hoiem 2016)
    lwf_temperature: float = 2.0  # lwf: softmax temperature T (Li and Hoiem 2016)
    olora_lambda1: float = 0.5  # olora: weight of the orthogonality term (O-LoRA's code)
    olora_lambda2: float = 0.0  # olora: weight of the new slice's L2 norm (O-LoRA's code)
    train_projector: bool = False  # the paper trains adapters only
    lr: float = 1.5e-3  # the calibrated setting (RESULTS.md, "How the stream was calibrated", step 9)
    epochs: int = 4
    batch_size: int = 8  # global batch (split across DDP ranks)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    max_length: int = 256
    n_train: int = 320  # sanity stream: training items per task
    n_test: int = 192  # sanity stream: test items per task (a binomial SE of about 3 points at 80%)
    limit: int | None = None  # keep the first N training and N test items of each task (a smoke run of the whole path)
    eval: str = "full"  # "full" lower triangle, or "diag-last": the new task, and all tasks at the end
    eval_batch_size: int = 48
    max_new_tokens: int = 32
    probe_size: int = 8  # test items per task whose gates are kept for the router-drift analysis
    importance_tokens: str = "all"  # Eq. 9's tokens: "all" attended (image, prompt, answer), "text" (no image tokens), "answer"
    dtype: str = "float32"  # "float32" or "bfloat16" (base weights; adapters stay fp32 under autocast)
    gradient_checkpointing: bool = False
    device: str | None = None  # default: cuda if available, else cpu
    seed: int = 0
    recipe: str | None = None  # "paper": PAPER_RECIPE under any explicit flag
    out: str | None = None  # run directory (default runs/<time>-<method>-s<seed>)

    def pas_config(self) -> PASsConfig | None:
        """The PASs layers' config of this method; None for the methods without adapters."""
        spec = METHODS[self.method][0]
        if spec is None:
            return None
        E, r = self.num_experts, self.rank
        if self.total_rank is not None:
            if self.total_rank % E:
                raise ValueError(f"--total-rank {self.total_rank} does not split over {E} experts")
            r = self.total_rank // E
        alpha = self.alpha
        if spec["gate"] == "single":  # same total rank and parameter count, same scaling alpha/r
            E, r, alpha = 1, E * r, alpha * E
        if spec.get("experts") == "per-task":  # one expert per task: the same total rank split over the tasks
            T = len(data.task_order(self.order))
            if E * r < T:
                raise ValueError(f"{self.method}: a total rank of {E * r} cannot give each of {T} tasks an expert")
            E, r, alpha = T, E * r // T, alpha / r * (E * r // T)
        return PASsConfig(num_experts=E, rank=r, alpha=alpha,
                          dropout=self.dropout, gate=spec["gate"], top_k=self.top_k, temperature=self.temperature,
                          lambda_a=self.lambda_a, lambda_b=self.lambda_b, weight_clip=self.weight_clip,
                          reg=spec["reg"], seed=self.seed)


# ---- setup ----


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        # rank 0 evaluates alone while the others wait: allow long evaluations
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), dist.get_world_size()


def load_tasks(cfg: RunConfig) -> list[data.Task]:
    """The stream's tasks in training order; --limit keeps the first N items of each split."""
    if cfg.stream == "sanity":
        tasks = data.sanity_stream(cfg.seed, cfg.order, cfg.n_train, cfg.n_test)
    elif cfg.stream == "ctbench":
        if not cfg.data_root:
            raise ValueError("--stream ctbench needs --data-root DIR (check it first: python data.py check DIR)")
        tasks = data.load_ctbench(cfg.data_root, cfg.order, cfg.image_root)
    else:
        raise ValueError(f"unknown --stream {cfg.stream!r}: sanity or ctbench")
    if cfg.limit is not None:
        tasks = [data.Task(t.key, t.train[:cfg.limit], t.test[:cfg.limit]) for t in tasks]
    return tasks


def load_model(cfg: RunConfig, device: torch.device) -> llava_wrap.LlavaBundle:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if cfg.model == "tiny":
        ranks = dist.is_available() and dist.is_initialized()
        if ranks and not is_main():
            dist.barrier()  # under torchrun only rank 0 builds an uncached base; the others then load it
        bundle = llava_wrap.pretrained_tiny(cfg.cache_dir, llava_wrap.TinyConfig(pretrain_steps=cfg.tiny_pretrain_steps))
        if ranks and is_main():
            dist.barrier()
        bundle.model.to(device=device, dtype=dtype)
    else:
        bundle = llava_wrap.load_llava(cfg.model, dtype=dtype, device=device)
    seed_everything(cfg.seed)  # the adapters' and routers' init: the same on every path and every DDP rank
    pas = cfg.pas_config()
    if pas is None:  # a method without adapters: everything frozen, the method unfreezes or adds what it trains
        bundle.model.requires_grad_(False)
    else:
        llava_wrap.add_adapters(bundle.model, pas, train_projector=cfg.train_projector, verbose=is_main())
    if cfg.gradient_checkpointing:
        bundle.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return bundle


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP without a buffer broadcast each step: the continual state (anchors, importance) is
    the same on every rank after end_task, and at E=6, r=128 the anchors alone are about 7 GiB.
    (torch >= 2.13 names the switch forward_sync_buffers; older releases broadcast_buffers.)"""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def git_commit() -> str:
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- one task ----


def task_loss(logits: torch.Tensor, labels: torch.Tensor, n_label_tokens: torch.Tensor | int, world: int) -> torch.Tensor:
    """Next-token cross entropy summed over answer tokens, divided by the global count.
    Times world size, because DDP averages gradients over ranks: the result equals one
    process on the whole global batch. Only the answer positions' logits are cast to fp32
    (all of them would be 2.4 GB at LLaVA-7B's batch 12 x 1536 x 32k)."""
    targets = labels[:, 1:][labels[:, 1:] != data.IGNORE]
    return F.cross_entropy(answer_logits(logits, labels).float(), targets, reduction="sum") * world / n_label_tokens


def batches(examples: list, batch_size: int, seed: int, rank: int, world: int):
    """Global batches in a seeded order; each rank takes every world-th example of each.
    A last batch smaller than the number of processes is skipped (train_task says so)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        if len(chunk) >= world:
            yield [examples[j] for j in chunk[rank::world]]


def by_length(examples: list, collate: data.Collator, batch_size: int):
    """Batches of examples of similar prompt length (less padding) for the passes whose result
    does not depend on how items are grouped: evaluation, importance, probes."""
    ordered = sorted(examples, key=lambda ex: collate.length(ex)[0])
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 runs keep fp32 adapters; autocast feeds the GEMMs bf16."""
    if cfg.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


LOG_EVERY = 25  # steps whose log values are fetched from the device together: one host sync per 25 steps


def train_task(cfg, t, task, examples, method, bundle, model, collate, device, log, rank, world):
    """Train task t on `examples`: fresh AdamW, cosine schedule with warmup,
    loss = task loss + the method's extra terms (pasmoe: Eq. 11)."""
    seed_everything(cfg.seed * 1000 + t)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tail = len(examples) % cfg.batch_size
    if 0 < tail < world and is_main():
        print(f"task {t + 1} ({task.key}): {tail} examples per epoch skipped (last batch smaller than {world} processes)")
    steps_per_epoch = len(examples) // cfg.batch_size + (tail >= world)
    total, warmup = cfg.epochs * steps_per_epoch, max(1, round(cfg.warmup_ratio * cfg.epochs * steps_per_epoch))
    model.train()
    step = 0
    pending = []  # (log record without its values, the values as one tensor, their names)
    bar = tqdm(total=total, desc=f"task {t + 1} {task.key}", disable=None if is_main() else True, leave=False)  # no bars in logs or on other ranks
    for epoch in range(cfg.epochs):
        for chunk in batches(examples, cfg.batch_size, cfg.seed * 1000 + t * 100 + epoch, rank, world):
            lr = cfg.lr * (step + 1) / warmup if step < warmup else \
                cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            inputs = llava_wrap.to_device(collate.train(chunk), device)
            labels = inputs.pop("labels")
            n_tokens = (labels[:, 1:] != data.IGNORE).sum()
            if world > 1:
                dist.all_reduce(n_tokens)
            with autocast(cfg, device):
                embeds, mask = llava_wrap.inputs(bundle, inputs)  # a method may prepend to both (L2P)
                logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -labels.shape[1]:]
                loss_task = task_loss(logits, labels, n_tokens, world)
                extra = method.extra_loss(inputs | {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels,
                                                    "logits": logits, "n_tokens": n_tokens, "world": world})
            loss = loss_task + sum(v.to(loss_task.device) for v in extra.values())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            shown = loss_task.detach() / world  # this rank's share of the global mean
            if world > 1:
                dist.all_reduce(shown)
            values = torch.stack([loss.detach(), shown] + [v.detach().to(loss.device) for v in extra.values()])
            pending.append(({"task": task.key, "step": step, "lr": lr}, values, ["loss", "task_loss", *extra]))
            bar.update()
            if len(pending) == LOG_EVERY:
                flush_log(pending, log, task, t, bar)
    flush_log(pending, log, task, t, bar)
    bar.close()


def flush_log(pending: list, log, task, t: int, bar) -> None:
    """Write the pending steps' log lines, fetching their values in one transfer, and stop the
    run at the first non-finite loss among them, in every process at the same step (the last
    finished task's checkpoint is intact)."""
    if not pending:
        return
    values = torch.stack([v for _, v, _ in pending])
    bad = (~torch.isfinite(values[:, 0])).int()  # per step, in this process
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    rows = values.tolist()
    for (record, _, names), row, stop in zip(pending, rows, bad.tolist()):
        if stop:
            raise FloatingPointError(
                f"non-finite loss (here {row[0]}) in task {t + 1} ({task.key}) at step {record['step']}: the "
                f"checkpoint of the last completed task is intact; lower --lr or check the data, then --resume")
        log(record | dict(zip(names, row)))
    bar.set_postfix(loss=f"{rows[-1][1]:.3f}")
    pending.clear()


def importance_mask(which: str, batch: dict, image_id: int) -> torch.Tensor:
    """The tokens Eq. 9 averages over. "all": every attended token (the paper's "tokens of
    task t": image, prompt and answer; padding never counts); "text": no image tokens;
    "answer": the answer tokens (those with a label)."""
    mask = batch["attention_mask"].bool()
    if which == "text":
        mask = mask & (batch["input_ids"] != image_id)
    elif which == "answer":
        mask = mask & (batch["labels"] != data.IGNORE)
    return mask


def _prefixed(mask: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """A (b, n) token mask for inputs that a method prepended to: its positions count as False."""
    return F.pad(mask, (embeds.shape[1] - mask.shape[1], 0), value=False)


@torch.no_grad()
def importance_pass(cfg, task, bundle, collate, device, rank, world) -> None:
    """Eq. 9 with the parameters that end the task: every counted token (cfg.importance_tokens)
    of the task's training data counts once (this rank's share; end_task all-reduces the sums)."""
    if not pas_layers(bundle.model):
        return
    bundle.model.eval()
    for chunk in by_length(task.train, collate, cfg.eval_batch_size):
        examples = chunk[rank::world]
        if not examples:
            continue
        batch = llava_wrap.to_device(collate.train(examples), device)
        with autocast(cfg, device):
            embeds, attention = llava_wrap.inputs(bundle, batch)
            mask = _prefixed(importance_mask(cfg.importance_tokens, batch, bundle.model.config.image_token_index), embeds)
            with track_importance(bundle.model, token_mask=mask):
                bundle.model(inputs_embeds=embeds, attention_mask=attention)


@torch.no_grad()
def evaluate_task(cfg, task, bundle, collate, device, method) -> tuple[float, list[dict]]:
    """Greedy answers on the task's test set, scored with the benchmark's scorer; rows in the
    test set's order. The method may set the experts for each batch (method.evaluating)."""
    metric = evaluate.TASK_METRICS[task.key]
    answers = {}
    for examples in by_length(task.test, collate, cfg.eval_batch_size):
        with autocast(cfg, device), method.evaluating(examples):
            answers |= zip(examples, llava_wrap.generate(bundle, llava_wrap.to_device(collate.prompts(examples), device),
                                                         cfg.max_new_tokens))
    rows = [{"question_id": ex.id, "prompt": ex.problem, "text": answers[ex], "reference": ex.solution,
             "score": evaluate.score(metric, answers[ex], ex.solution)} for ex in task.test]  # the benchmark's re-scoring reads question_id, prompt, text
    return sum(r["score"] for r in rows) / len(rows), rows


@torch.no_grad()
def probe_gates(cfg, task, bundle, collate, device, method) -> dict[str, torch.Tensor]:
    """Mixture weights of every PASs layer on the first probe_size test items of a task:
    {layer name: (real tokens, E)}, for the router-drift analysis (paper Fig. 3)."""
    examples = task.test[:cfg.probe_size]
    batch = llava_wrap.to_device(collate.train(examples), device)
    gates, hooks = {}, []
    bundle.model.eval()
    with autocast(cfg, device), method.evaluating(examples):
        embeds, attention = llava_wrap.inputs(bundle, batch)
        mask = _prefixed(batch["attention_mask"].bool(), embeds)
        for name, layer in pas_layers(bundle.model).items():
            def hook(module, args, output, name=name):
                gates[name] = module.gate(args[0])[mask].float().cpu()
            hooks.append(layer.register_forward_hook(hook))
        try:
            bundle.model(inputs_embeds=embeds, attention_mask=attention)
        finally:
            for h in hooks:
                h.remove()
    return gates


# ---- the run ----


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment(device) -> dict:
    import transformers

    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "commit": git_commit(), "device_name": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv}


@dataclass
class Run:
    """What one run holds while it trains: its settings, processes, data, model and method."""

    cfg: RunConfig
    out: Path  # the run directory
    rank: int
    world: int
    device: torch.device
    tasks: list[data.Task]
    bundle: llava_wrap.LlavaBundle
    model: torch.nn.Module  # what trains: the bundle's model, or its DDP wrapper
    collate: data.Collator
    method: object  # a baselines.Method
    cut: dict  # per task: training sequences that max_length cuts (data.length_problems)
    log_file: object = None  # log.jsonl, open on rank 0

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tasks]

    def log(self, record: dict) -> None:
        """One JSON line per training step (rank 0 only)."""
        if self.log_file is not None:
            self.log_file.write(json.dumps(record) + "\n")


def preflight(cfg: RunConfig, tasks: list[data.Task], bundle: llava_wrap.LlavaBundle, collate: data.Collator) -> dict:
    """Everything the stream will need, checked before the first step: each image file decodes,
    each prompt fits. Raises one DataError listing every problem, each naming what to change;
    returns what max_length cuts from training sequences (counted, then reported)."""
    problems = []
    if cfg.stream == "ctbench":
        examples = [ex for t in tasks for ex in t.train + t.test]
        problems += data.check_images(examples, Path(cfg.image_root), Path(cfg.data_root))
    context = bundle.model.config.text_config.max_position_embeddings
    found, cut = data.length_problems(tasks, collate, cfg.max_length, context, cfg.max_new_tokens)
    if found and cfg.stream == "ctbench" and cfg.recipe is None:
        found.append(f"--stream ctbench without --recipe paper trains with the sanity stream's settings "
                     f"(--max-length {cfg.max_length}); --recipe paper sets the paper's, --max-length 1536")
    problems += found
    if problems:
        raise data.DataError("the stream cannot run as configured; nothing was trained:\n  " + "\n  ".join(problems))
    for line in data.describe_cuts(cut, cfg.max_length):
        print("note:", line)
    return cut


def method_passes(cfg: RunConfig, bundle: llava_wrap.LlavaBundle, collate: data.Collator, device) -> tuple:
    """What methods may compute on examples besides the training step: (forward, features).
    forward(examples) -> (logits, labels), for passes of their own (EWC, MAS); features(examples)
    -> each example's frozen features {"image": the mean over its image's positions of the vision
    features, or None; "text": the mean embedding of its instruction's tokens}, for the methods that
    pick experts or prompts from the input (L2P, HiDe-LLaVA, DDAS)."""

    def forward(examples):
        inputs = llava_wrap.to_device(collate.train(examples), device)
        with autocast(cfg, device):
            return llava_wrap.forward(bundle, inputs), inputs["labels"]

    @torch.no_grad()
    def features(examples):
        with_image = [ex for ex in examples if ex.image is not None]
        images = iter(llava_wrap.vision_features(bundle, with_image).float().mean(1) if with_image else ())
        table = bundle.model.get_input_embeddings()
        out = []
        for ex in examples:
            ids = torch.tensor(collate.tok(ex.problem, add_special_tokens=False)["input_ids"], device=device)
            out.append({"image": next(images) if ex.image is not None else None, "text": table(ids).float().mean(0)})
        return out

    return forward, features


def setup(cfg: RunConfig, resume: Path | None) -> Run:
    """Processes, device, tasks, the model with its adapters, the method; then the preflight."""
    rank, world = distributed()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    device = torch.device(cfg.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"))
    out = Path(resume or cfg.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}-{cfg.method}-s{cfg.seed}")
    if cfg.stream == "ctbench" and cfg.image_root is None and cfg.data_root:  # saved as resolved
        cfg = dataclasses.replace(cfg, image_root=str(data.default_image_root(cfg.data_root)))
    tasks = load_tasks(cfg)
    bundle = load_model(cfg, device)
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    kept = llava_wrap.cache_vision_features(bundle, [ex for t in tasks for ex in t.train + t.test])
    if is_main():
        print(kept)
    checked = [None]
    if is_main():
        try:
            checked = [preflight(cfg, tasks, bundle, collate)]
        except data.DataError as err:
            checked = [err]
    if world > 1:  # every process stops with the same message, or goes on
        dist.broadcast_object_list(checked, src=0)
    if isinstance(checked[0], Exception):
        raise checked[0]

    method = METHODS[cfg.method][1](cfg, bundle.model, tasks, *method_passes(cfg, bundle, collate, device))
    bundle.input_hook = method.inputs
    model = data_parallel(bundle.model, device) if world > 1 else bundle.model  # after the method made its parameters
    return Run(cfg, out, rank, world, device, tasks, bundle, model, collate, method, checked[0] or {})


def open_run(run: Run, resume: bool) -> dict:
    """A fresh run directory with the full config, or the saved state of one being resumed:
    adapters and method state of the last finished task, log lines of finished tasks only."""
    cfg, out, T = run.cfg, run.out, len(run.tasks)
    state = {"completed": 0, "evaluated": 0, "R": [[None] * T for _ in range(T)], "train_s": [], "eval_s": [],
             "truncated": {k: c["sequences"] for k, c in run.cut.items()}}
    if resume:
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else state
        state.setdefault("evaluated", state["completed"])
        if state["completed"]:
            llava_wrap.load_adapters(run.bundle.model, out / "ckpt" / f"task{state['completed']}.safetensors")
            saved = out / "ckpt" / f"method{state['completed']}.safetensors"
            if saved.exists():
                run.method.load_state_dict(load_file(saved, device=str(run.device)))
        if is_main():
            print(f"resuming {out} after task {state['completed']} of {T}")
            done = set(run.keys[:state["completed"]])  # drop the log lines of the interrupted task
            lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
            atomic_write(out / "log.jsonl", "".join(l + "\n" for l in lines if _logged_task(l) in done))
            config = json.loads((out / "config.json").read_text())
            if config["image_root"] != cfg.image_root:  # a path may move between attempts
                atomic_write(out / "config.json", json.dumps(config | {"image_root": cfg.image_root}, indent=1))
    elif is_main():
        out.mkdir(parents=True, exist_ok=False)
        for sub in ("ckpt", "predictions", "gates"):
            (out / sub).mkdir()
        pas = cfg.pas_config()
        config = asdict(cfg) | {"pas_config": asdict(pas) if pas else None, "base": run.bundle.name, "base_info": run.bundle.info,
                                "tasks": run.keys, "world_size": run.world} | environment(run.device)
        atomic_write(out / "config.json", json.dumps(config, indent=1))
        trainable, _ = llava_wrap.count_parameters(run.bundle.model)
        print(f"run directory {out}; {cfg.method}: {trainable:,} trainable parameters")
    if run.world > 1:
        dist.barrier()
    if is_main():
        run.log_file = open(out / "log.jsonl", "a")
    return state


def _logged_task(line: str) -> str | None:
    """The task of a log line; None for a line that a hard kill cut short (it belongs to the
    interrupted task, whose lines are dropped anyway)."""
    try:
        return json.loads(line)["task"]
    except json.JSONDecodeError:
        return None


def save_state(run: Run, state: dict) -> None:
    if is_main():
        atomic_write(run.out / "state.json", json.dumps(state, indent=1))
        run.log_file.flush()


def run_task(run: Run, state: dict, t: int) -> None:
    """Task t: train (the method's examples), importance pass, end of task, checkpoint, evaluation."""
    task = run.tasks[t]
    start = time.time()
    run.method.begin_task(t)
    examples = run.method.examples(t)
    if examples is not None:  # None: this method trains nothing at step t (joint, before the end)
        train_task(run.cfg, t, task, examples, run.method, run.bundle, run.model, run.collate, run.device, run.log,
                   run.rank, run.world)
        importance_pass(run.cfg, task, run.bundle, run.collate, run.device, run.rank, run.world)
        end_task(run.bundle.model)
        run.method.end_task(t)
    state["train_s"].append(round(time.time() - start, 2))
    state.setdefault("trained", []).append(examples is not None)
    if is_main():
        llava_wrap.save_adapters(run.bundle.model, run.out / "ckpt" / f"task{t + 1}.safetensors", meta={"task": task.key, "index": t})
        method_state = run.method.state_dict()
        if method_state:  # EWC, MAS: importance and anchors
            tmp = run.out / "ckpt" / f".method{t + 1}.tmp"
            save_file({k: v.contiguous() for k, v in method_state.items()}, tmp)
            os.replace(tmp, run.out / "ckpt" / f"method{t + 1}.safetensors")  # atomic, like the adapters
    state["completed"] = t + 1
    save_state(run, state)  # trained and saved: a crash in the evaluation below does not retrain it
    evaluate_after(run, state, t)


def evaluate_after(run: Run, state: dict, t: int) -> None:
    """Evaluate after task t (row t of R), keep the probes' gates, print the row (rank 0)."""
    start = time.time()
    cfg, task, last = run.cfg, run.tasks[t], t == len(run.tasks) - 1
    trained = state["trained"][t] if "trained" in state else run.method.examples(t) is not None  # older runs: ask
    if is_main():
        evaluated = [] if not trained else range(t + 1) if cfg.eval == "full" or last else [t]
        for j in evaluated:
            score, rows = evaluate_task(cfg, run.tasks[j], run.bundle, run.collate, run.device, run.method)
            state["R"][t][j] = score
            with open(run.out / "predictions" / f"after{t + 1}_{run.keys[j]}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if trained:
            torch.save(probe_gates(cfg, task, run.bundle, run.collate, run.device, run.method), run.out / "gates" / f"{task.key}_after.pt")
        if last:
            for old in run.tasks:
                torch.save(probe_gates(cfg, old, run.bundle, run.collate, run.device, run.method), run.out / "gates" / f"{old.key}_final.pt")
        state["evaluated"] = t + 1
        state["eval_s"].append(round(time.time() - start, 2))
        if run.method.task_id_accuracy() is not None:  # HiDe-LLaVA, DDAS: kept with the state, which survives a resume
            state["task_id_accuracy"] = run.method.task_id_accuracy()
        save_state(run, state)
        row = " ".join("    -" if v is None else f"{v:5.1f}" for v in state["R"][t])
        cut = run.cut.get(task.key)
        cut = f"; {cut['sequences']} of {cut['of']} training sequences cut at --max-length" if cut else ""
        trained = f"{state['train_s'][t]:.0f}s train" if trained else f"{cfg.method} trains at the end"
        print(f"after task {t + 1} ({task.key}, {trained}{cut}): {row}")
    if run.world > 1:
        dist.barrier()


def finish(run: Run, state: dict) -> None:
    """The matrix, the metrics and the run's report."""
    if not is_main():
        return
    run.log_file.close()
    metrics = evaluate.cl_metrics(state["R"]) | {"train_s": state["train_s"], "eval_s": state["eval_s"],
                                                  "truncated": state["truncated"]}
    if "task_id_accuracy" in state:  # HiDe-LLaVA, DDAS: how often they picked the right expert, at the end
        metrics["task_id_accuracy"] = state["task_id_accuracy"]
    atomic_write(run.out / "matrix.json", json.dumps({"tasks": run.keys, "R": state["R"]}, indent=1))
    atomic_write(run.out / "metrics.json", json.dumps(metrics, indent=1))
    evaluate.main([str(run.out)])


def run(cfg: RunConfig, resume: Path | None = None) -> Path:
    """Train the whole stream; returns the run directory."""
    run_ = setup(cfg, resume)
    state = open_run(run_, resume is not None)
    if state["evaluated"] < state["completed"]:  # trained and saved, but the evaluation was interrupted
        evaluate_after(run_, state, state["completed"] - 1)
    for t in range(state["completed"], len(run_.tasks)):
        run_task(run_, state, t)
    finish(run_, state)
    return run_.out


# ---- command line ----


def parse_args(argv=None) -> tuple[RunConfig, Path | None]:
    """(config, run directory to resume or None)."""
    parser = argparse.ArgumentParser(description="Continual training of LLaVA-1.5 with PASs-MoE and its baselines.")
    parser.add_argument("--resume", type=Path, default=None, help="continue the run in this directory after its last finished task")
    comments = _field_comments()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type.split("|")[0].strip()]
        help_text = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = {"method": list(METHODS), "stream": ["sanity", "ctbench"], "eval": ["full", "diag-last"],
                       "dtype": ["float32", "bfloat16"], "recipe": ["paper"],
                       "importance_tokens": ["all", "text", "answer"]}.get(f.name)
            parser.add_argument(flag, type=kind, default=None, choices=choices, help=f"{help_text} (default: {f.default})")
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    if resume:
        given = [k for k, v in args.items() if v is not None and k != "image_root"]
        if given:
            parser.error(f"--resume takes the run's saved config (only --image-root, a path, may change); "
                         f"drop {', '.join('--' + k.replace('_', '-') for k in given)}")
        saved = json.loads((resume / "config.json").read_text())
        cfg = RunConfig(**{f.name: saved[f.name] for f in dataclasses.fields(RunConfig)})
        return dataclasses.replace(cfg, image_root=args["image_root"] or cfg.image_root), resume
    preset = dict(PAPER_RECIPE) if args.get("recipe") == "paper" else {}
    if preset and args["alpha"] is None and (args["rank"] or args["total_rank"]):  # keep the recipe's alpha / r = 2
        E = args["num_experts"] or preset["num_experts"]
        preset["alpha"] = 2.0 * (args["total_rank"] // E if args["total_rank"] else args["rank"])  # as pas_config reads them
    cfg = RunConfig(**(preset | {k: v for k, v in args.items() if v is not None}))
    if cfg.recipe == "paper" and cfg.model == "tiny":
        parser.error("--recipe paper is LLaVA-1.5-7B's: add --model llava-hf/llava-1.5-7b-hf (or a local copy)")
    return cfg, None


def _field_comments() -> dict[str, str]:
    """The comment beside each RunConfig field, reused as its --help text (read from this
    file, so it works however the script was started, e.g. under python -m cProfile)."""
    import re

    src = Path(__file__).read_text()
    body = src[src.index("class RunConfig:"):src.index("    def pas_config(self)")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$", body, re.MULTILINE)}


def main(argv=None) -> None:
    run(*parse_args(argv))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
