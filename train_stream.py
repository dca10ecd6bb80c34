"""The continual stream: train on tasks in order, evaluate after each, report forgetting.

    python train_stream.py                               pasmoe on the offline sanity stream (CPU)
    python train_stream.py --method moelora --seed 1     a baseline (baselines.METHODS)
    python train_stream.py --recipe paper --stream ctbench --data-root DIR --model llava-hf/llava-1.5-7b-hf
    torchrun --nproc_per_node=8 train_stream.py ...      data parallel
    python train_stream.py --resume runs/RUN             continue after the last finished task

The loop, for every method (baselines.py) and both streams:

    for t, task in enumerate(stream):
        method.begin_task(t)
        train: fresh AdamW, cosine schedule; loss = task loss + the method's terms (pasmoe: Eq. 11)
        importance: a no-grad pass over the task's training data with the parameters that end the task (Eq. 9)
        end_task (Eq. 10, anchors), method.end_task(t)
        checkpoint, then evaluate on the tasks seen so far (row t of the accuracy matrix)

Each task reseeds from (seed, task index), so a run resumed from a task checkpoint repeats an
uninterrupted one. The run directory, its state and resume are engine.RunDir's; the flags and
their checks are at the end of this file.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

import data
import evaluate
import llava_wrap
from baselines import METHODS, answer_logits
from config import RunConfig, adapters, parse_args
from engine.processes import data_parallel, init_processes, is_main
from engine.runs import RunDir, environment
from engine.steps import StepLog, cosine_lr, optimizer_step
from pasmoe import end_task, pas_layers, track_importance
from toy import sanity, tiny_llava

# ---- setup ----


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
    if cfg.model == "tiny":
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What one run holds while it trains."""

    cfg: RunConfig
    dir: RunDir
    rank: int
    world: int
    device: torch.device
    tasks: list[data.Task]
    bundle: llava_wrap.LlavaBundle
    model: torch.nn.Module  # what trains: the bundle's model, or its DDP wrapper
    collate: data.Collator
    method: object  # a baselines.Method
    cut: dict  # per task: training sequences that --max-length cuts (data.length_problems)


def setup(cfg: RunConfig, resume: bool) -> tuple[Run, dict]:
    """Processes, tasks, model, the preflight, the method, and the state (fresh or resumed)."""
    rank, world, device = init_processes(cfg.device)
    tasks = load_tasks(cfg)
    bundle = load_model(cfg, device)
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    kept = llava_wrap.cache_vision_features(bundle, [ex for t in tasks for ex in t.train + t.test])
    checked = [check_stream(cfg, tasks, bundle, collate) if is_main() else None]
    if world > 1:  # every process stops with the same message, or goes on
        dist.broadcast_object_list(checked, src=0)
    if isinstance(checked[0], data.DataError):
        raise checked[0]
    passes = llava_wrap.passes(bundle, collate, device, cfg.eval_batch_size, partial(autocast, cfg, device))
    method = METHODS[cfg.method].cls(cfg, bundle.model, tasks, *passes)
    bundle.input_hook = method.inputs
    run = Run(cfg, RunDir(cfg.out), rank, world, device, tasks, bundle, bundle.model, collate, method, checked[0])
    state = open_run(run, resume, kept)
    if world > 1:  # after the method made its parameters and the resumed state is in
        run.model = data_parallel(bundle.model, device)
    return run, state


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


def open_run(run: Run, resume: bool, kept: str) -> dict:
    """A fresh run directory with the full config, or the state of the one being resumed: adapters and
    method state of its last finished task loaded, log lines of unfinished tasks dropped."""
    cfg, T = run.cfg, len(run.tasks)
    state = run.dir.state(T)
    if resume and state["completed"]:
        llava_wrap.load_adapters(run.bundle.model, run.dir.path / "ckpt" / f"task{state['completed']}.safetensors")
        saved = run.dir.path / "ckpt" / f"method{state['completed']}.safetensors"
        if saved.exists():
            run.method.load_state_dict(load_file(saved, device=str(run.device)))
    if is_main() and resume:
        print(f"resuming {run.dir.path} after task {state['completed']} of {T}")
        if run.dir.config()["image_root"] != cfg.image_root:  # a path may move between attempts
            run.dir.write_json("config.json", run.dir.config() | {"image_root": cfg.image_root})
    elif is_main():
        built = adapters(cfg)
        run.dir.create(
            asdict(cfg)
            | {
                "pas_config": asdict(built[0]) if built else None,
                "base": run.bundle.name,
                "base_info": run.bundle.info,
                "tasks": [t.key for t in run.tasks],
                "world_size": run.world,
            }
            | environment(run.device)
        )
        state["truncated"] = {k: c["sequences"] for k, c in run.cut.items()}
        trainable = sum(p.numel() for p in run.bundle.model.parameters() if p.requires_grad)
        print(f"{kept}\nrun directory {run.dir.path}; {cfg.method}: {trainable:,} trainable parameters")
    if is_main():
        run.dir.open_log([t.key for t in run.tasks[: state["completed"]]])
        print(
            f"{T} tasks, order {cfg.order}: {' -> '.join(t.key for t in run.tasks)}. After each task, the score "
            f"(0-100) on each task seen so far, in this order:"
        )
    return state


# ---- one task ----


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, n_label_tokens: torch.Tensor | int, world: int
) -> torch.Tensor:
    """Next-token cross entropy summed over answer tokens, over the global count of answer tokens, times
    the world size (DDP averages gradients over ranks): equal to one process on the whole global batch.
    Only the answer positions' logits are cast to fp32 (all of them: 2.4 GB at the 7B recipe's batch)."""
    targets = labels[:, 1:][labels[:, 1:] != data.IGNORE]
    return F.cross_entropy(answer_logits(logits, labels).float(), targets, reduction="sum") * world / n_label_tokens


def batches(examples: list, batch_size: int, seed: int, rank: int, world: int):
    """Global batches in a seeded order; each rank takes every world-th example of each. A last batch
    smaller than the number of processes is skipped (train_task says so)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        if len(chunk) >= world:
            yield [examples[j] for j in chunk[rank::world]]


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 runs keep fp32 adapters; autocast feeds the GEMMs bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def train_step(run: Run, chunk: list) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one batch: (task loss, the method's terms by name)."""
    inputs = llava_wrap.to_device(run.collate.train(chunk), run.device)
    labels = inputs.pop("labels")
    n_tokens = (labels[:, 1:] != data.IGNORE).sum()
    if run.world > 1:
        dist.all_reduce(n_tokens)
    with autocast(run.cfg, run.device):
        embeds, mask = llava_wrap.inputs(run.bundle, inputs)  # a method may prepend to both (L2P)
        logits = run.model(inputs_embeds=embeds, attention_mask=mask).logits[:, -labels.shape[1] :]
        loss = task_loss(logits, labels, n_tokens, run.world)
        extra = run.method.extra_loss(
            inputs
            | {
                "inputs_embeds": embeds,
                "attention_mask": mask,
                "labels": labels,
                "logits": logits,
                "n_tokens": n_tokens,
                "world": run.world,
            }
        )
    (loss + sum(v.to(loss.device) for v in extra.values())).backward()
    return loss.detach(), {k: v.detach() for k, v in extra.items()}


def train_task(run: Run, t: int, examples: list) -> None:
    """Task t: a fresh AdamW (each task is its own fine-tuning run), a cosine schedule with warmup."""
    cfg, key = run.cfg, run.tasks[t].key
    seed_everything(cfg.seed * 1000 + t)
    params = [p for p in run.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tail = len(examples) % cfg.batch_size
    if 0 < tail < run.world and is_main():
        print(
            f"task {t + 1} ({key}): {tail} examples per epoch skipped (last batch smaller than {run.world} processes)"
        )
    total = cfg.epochs * (len(examples) // cfg.batch_size + (tail >= run.world))
    warmup = max(1, round(cfg.warmup_ratio * total))
    run.model.train()
    bar = tqdm(
        total=total, desc=f"task {t + 1}/{len(run.tasks)} {key}", disable=None if is_main() else True, leave=False
    )
    log = StepLog(run.dir.log if is_main() else lambda record: None, f"task {t + 1} ({key})", bar)
    step = 0
    for epoch in range(cfg.epochs):
        for chunk in batches(examples, cfg.batch_size, cfg.seed * 1000 + t * 100 + epoch, run.rank, run.world):
            loss, extra = train_step(run, chunk)
            lr = cosine_lr(step, total, warmup, cfg.lr)
            optimizer_step(opt, params, lr, cfg.clip_norm)
            step += 1
            shown = loss / run.world  # this rank's share of the global mean
            if run.world > 1:
                dist.all_reduce(shown)
            log.add(
                {"task": key, "step": step, "lr": lr}, {"loss": loss + sum(extra.values()), "task_loss": shown, **extra}
            )
            bar.update()
    log.flush()
    bar.close()


@torch.no_grad()
def importance_pass(run: Run, task: data.Task) -> None:
    """Eq. 9 with the parameters that end the task: each counted token of the task's training data once
    (this rank's share; end_task all-reduces the sums)."""
    if not pas_layers(run.bundle.model):
        return
    run.bundle.model.eval()
    for chunk in run.collate.by_length(task.train, run.cfg.eval_batch_size):
        if not (examples := chunk[run.rank :: run.world]):
            continue
        batch = llava_wrap.to_device(run.collate.train(examples), run.device)
        with autocast(run.cfg, run.device):
            embeds, attention = llava_wrap.inputs(run.bundle, batch)
            mask = run.collate.counted(batch, run.cfg.importance_tokens)
            with track_importance(run.bundle.model, token_mask=F.pad(mask, (embeds.shape[1] - mask.shape[1], 0))):
                run.bundle.model(inputs_embeds=embeds, attention_mask=attention)  # prepended prompts count as padding


# ---- evaluation ----


@torch.no_grad()
def evaluate_task(run: Run, task: data.Task) -> tuple[float, list[dict]]:
    """Greedy answers on the task's test set, scored with the benchmark's scorer, rows in its order.
    The method may pick the experts of each batch (method.evaluating)."""
    replies = {}
    for examples in tqdm(
        run.collate.by_length(task.test, run.cfg.eval_batch_size),
        desc=f"evaluating {task.key}",
        leave=False,
        disable=None if is_main() else True,
    ):
        with autocast(run.cfg, run.device), run.method.evaluating(examples):
            batch = llava_wrap.to_device(run.collate.prompts(examples), run.device)
            replies |= zip(examples, llava_wrap.generate(run.bundle, batch, run.cfg.max_new_tokens))
    return evaluate.score_rows(task.key, task.test, [replies[ex] for ex in task.test])


def probe_gates(run: Run, task: data.Task) -> dict[str, torch.Tensor]:
    """The gates of every PASs layer on the first --probe-size test items, for the router-drift analysis."""
    examples = task.test[: run.cfg.probe_size]
    run.bundle.model.eval()
    with autocast(run.cfg, run.device), run.method.evaluating(examples):
        return llava_wrap.mixture_weights(run.bundle, llava_wrap.to_device(run.collate.train(examples), run.device))


def evaluate_after(run: Run, state: dict, t: int) -> None:
    """Row t of the accuracy matrix (rank 0), the probes' gates, the row printed."""
    start, task, last = time.time(), run.tasks[t], t == len(run.tasks) - 1
    trained = state["trained"][t]
    if is_main():
        seen = [] if not trained else range(t + 1) if run.cfg.eval == "full" or last else [t]
        for j in seen:
            state["R"][t][j], rows = evaluate_task(run, run.tasks[j])
            with open(run.dir.path / "predictions" / f"after{t + 1}_{run.tasks[j].key}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        for probed, when in ([(task, "after")] if trained else []) + (
            [(old, "final") for old in run.tasks] if last else []
        ):
            torch.save(probe_gates(run, probed), run.dir.path / "gates" / f"{probed.key}_{when}.pt")
        state["evaluated"] = t + 1
        state["eval_s"].append(round(time.time() - start, 2))
        if run.method.task_id_accuracy() is not None:  # HiDe-LLaVA, DDAS: kept with the state (it survives a resume)
            state["task_id_accuracy"] = run.method.task_id_accuracy()
        run.dir.save_state(state)
        row = " ".join("    -" if v is None else f"{v:5.1f}" for v in state["R"][t])
        cut = run.cut.get(task.key)
        cut = f"; {cut['sequences']} of {cut['of']} training sequences cut at --max-length" if cut else ""
        what = f"{state['train_s'][t]:.0f}s train" if trained else f"{run.cfg.method} trains at the end"
        print(f"after task {t + 1} ({task.key}, {what}{cut}): {row}")
    if run.world > 1:
        dist.barrier()


# ---- the run ----


def run_task(run: Run, state: dict, t: int) -> None:
    """Task t: train on the method's examples, importance, end of task, checkpoint, evaluation."""
    start = time.time()
    run.method.begin_task(t)
    examples = run.method.examples(t)
    if examples is not None:  # None: this method trains nothing at step t (joint, before the end)
        train_task(run, t, examples)
        importance_pass(run, run.tasks[t])
        end_task(run.bundle.model)
        run.method.end_task(t)
    state["train_s"].append(round(time.time() - start, 2))
    state["trained"].append(examples is not None)
    if is_main():
        ckpt = run.dir.path / "ckpt"
        llava_wrap.save_adapters(run.bundle.model, ckpt / f"task{t + 1}.safetensors", meta={"task": run.tasks[t].key})
        if method_state := run.method.state_dict():  # EWC, MAS, HiDe-LLaVA, DDAS
            llava_wrap.save_tensors(method_state, ckpt / f"method{t + 1}.safetensors")
        state["completed"] = t + 1
        run.dir.save_state(state)  # trained and saved: a crash in the evaluation below does not retrain it
    evaluate_after(run, state, t)


def finish(run: Run, state: dict) -> None:
    """The matrix, the metrics and the run's report."""
    if not is_main():
        return
    run.dir.log_file.close()
    metrics = evaluate.cl_metrics(state["R"]) | {
        k: state[k] for k in ("train_s", "eval_s", "truncated", "task_id_accuracy") if k in state
    }
    run.dir.write_json("matrix.json", {"tasks": [t.key for t in run.tasks], "R": state["R"]})
    run.dir.write_json("metrics.json", metrics)
    evaluate.main([str(run.dir.path)])


def run(cfg: RunConfig, resume: bool = False) -> Path:
    """Train the whole stream (or the rest of it); returns the run directory."""
    run_, state = setup(cfg, resume)
    if state["evaluated"] < state["completed"]:  # trained and saved, but its evaluation was interrupted
        evaluate_after(run_, state, state["completed"] - 1)
    for t in range(state["completed"], len(run_.tasks)):
        run_task(run_, state, t)
    finish(run_, state)
    return run_.dir.path


def main(argv=None) -> None:
    cfg, resume = parse_args(argv)
    try:
        run(cfg, resume)
    except (
        data.DataError,
        llava_wrap.ModelError,
    ) as err:  # the inputs, not the code: told in words, without a traceback
        sys.exit(f"train_stream.py: error: {err}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
