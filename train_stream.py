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
uninterrupted one. The settings, what they build and their checks are config.py's; the run directory,
its state and resume engine/runs.py's; processes, sharding and the memory plan engine/'s.
"""

from __future__ import annotations

import gc
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

import config
import data
import evaluate
import llava_wrap
from baselines import METHODS, answer_logits
from config import RESUME_MAY_CHANGE, RunConfig, adapters, parse_args
from engine.processes import data_parallel, finish_gradients, gather, gradient_sync, init_processes, is_main, lockstep
from engine.runs import RunDir, RunDirError, environment
from engine.steps import StepLog, cosine_lr, micro_batches, optimizer_step, seed_everything
from pasmoe import end_task, pas_layers, track_importance

# ---- setup ----


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
    if world > 1:  # each rank named a default run directory by its own clock: rank 0's name for all
        cfg.out = gather(cfg.out)[0]
    tasks = config.load_tasks(cfg)
    if device.type == "cuda" and (too_big := config.memory_plan(cfg, tasks, world, device)[1]):
        raise llava_wrap.ModelError(f"this run does not fit its GPUs (nothing was loaded): {too_big}")
    bundle = config.load_model(cfg, device)
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    kept = llava_wrap.cache_vision_features(bundle, [ex for t in tasks for ex in t.train + t.test])
    checked = [config.check_stream(cfg, tasks, bundle, collate) if is_main() else None]
    if world > 1:  # every process stops with the same message, or goes on
        dist.broadcast_object_list(checked, src=0)
    if isinstance(checked[0], data.DataError):
        raise checked[0]
    passes = llava_wrap.passes(bundle, collate, device, cfg.eval_batch_size, partial(autocast, cfg, device))
    method = METHODS[cfg.method].cls(cfg, bundle.model, tasks, *passes)
    bundle.input_hook = method.inputs
    run = Run(cfg, RunDir(cfg.out), rank, world, device, tasks, bundle, bundle.model, collate, method, checked[0])
    state = open_run(run, resume, kept)
    if cfg.shard:  # after the method made its parameters and the resumed state is in (both as whole tensors)
        llava_wrap.shard_llava(bundle.model, cfg.dtype == "bfloat16")
        method.sharded()
    elif world > 1:
        run.model = data_parallel(bundle.model, device)
    return run, state


def open_run(run: Run, resume: bool, kept: str) -> dict:
    """A fresh run directory with the full config, or the state of the one being resumed, with the adapters
    and the method's state of its last finished task loaded (engine.runs.RunDir)."""
    cfg, T = run.cfg, len(run.tasks)
    built = adapters(cfg)
    fresh = asdict(cfg) | {
        "pas_config": asdict(built[0]) if built else None,
        "base": run.bundle.name,
        "base_info": run.bundle.info,
        "tasks": [t.key for t in run.tasks],
        "world_size": run.world,
    }
    changed = {k: getattr(cfg, k) for k in RESUME_MAY_CHANGE}  # the values this attempt runs with
    state = run.dir.open(None if resume else fresh | environment(run.device), T, changed)
    if done := state["completed"]:
        llava_wrap.load_adapters(run.bundle.model, run.dir.path / "ckpt" / f"task{done}.safetensors")
        if (saved := run.dir.path / "ckpt" / f"method{done}.safetensors").exists():
            run.method.load_state_dict(load_file(saved, device=str(run.device)))
    if is_main():
        state.setdefault("truncated", {k: c["sequences"] for k, c in run.cut.items()})
        trainable = sum(p.numel() for p in run.bundle.model.parameters() if p.requires_grad)
        print(
            f"resuming {run.dir.path} after task {done} of {T}"
            if resume
            else f"{kept}\nrun directory {run.dir.path}; {cfg.method}: {trainable:,} trainable parameters"
        )
        run.dir.open_log([t.key for t in run.tasks[:done]])
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


def batches(examples: list, batch_size: int, seed: int, world: int):
    """Global batches in a seeded order (each rank takes its part: engine.steps.micro_batches). A last batch
    smaller than the number of processes is skipped (train_task says so)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        if len(chunk := order[i : i + batch_size]) >= world:
            yield [examples[j] for j in chunk]


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 runs keep fp32 adapters; autocast feeds the GEMMs bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def train_step(run: Run, batch: list) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one global batch: this rank's part, micro-batch by micro-batch, the gradients
    accumulated (and synchronized once, on the last). Returns (task loss, the method's terms), summed."""
    parts = micro_batches(batch, run.rank, run.world, run.cfg.micro_batch_size)
    collated = [llava_wrap.to_device(run.collate.train(items), run.device) for items, _ in parts]
    for b, (_, share) in zip(collated, parts):
        if share == 0:  # a stand-in micro-batch: it keeps the ranks in step and adds nothing
            b["labels"].fill_(data.IGNORE)
    n_tokens = sum((b["labels"][:, 1:] != data.IGNORE).sum() for b in collated)  # the whole step's, all ranks
    if run.world > 1:
        dist.all_reduce(n_tokens)
    loss, extra = 0.0, {}
    for i, (inputs, (_, share)) in enumerate(zip(collated, parts)):
        labels = inputs.pop("labels")
        with gradient_sync(run.model, last=i == len(parts) - 1), autocast(run.cfg, run.device):
            embeds, mask = llava_wrap.inputs(run.bundle, inputs)  # a method may prepend to both (L2P)
            logits = run.model(inputs_embeds=embeds, attention_mask=mask).logits[:, -labels.shape[1] :]
            part = task_loss(logits, labels, n_tokens, run.world)
            terms = run.method.extra_loss(
                inputs
                | {
                    "inputs_embeds": embeds,
                    "attention_mask": mask,
                    "labels": labels,
                    "logits": logits,
                    "n_tokens": n_tokens,
                    "world": run.world,
                    "items": len(batch),
                    "share": share,
                }
            )
            (part + sum(v.to(part.device) for v in terms.values())).backward()
        loss = loss + part.detach()
        # a term may be a CPU zero (Eq. 11 before any task has ended)
        extra = {k: extra.get(k, 0.0) + v.detach().to(part.device) for k, v in terms.items()}
    finish_gradients(run.model)
    return loss, extra


def train_task(run: Run, t: int, examples: list) -> None:
    """Task t: a fresh AdamW (each task is its own fine-tuning run), a cosine schedule with warmup."""
    cfg, key = run.cfg, run.tasks[t].key
    seed_everything(cfg.seed * 1000 + t)
    params = [p for p in run.model.parameters() if p.requires_grad]
    # FSDP2 puts sharded and whole parameters in one list, which AdamW's foreach kernels refuse to mix
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False if cfg.shard else None)
    tail = len(examples) % cfg.batch_size
    if 0 < tail < run.world and is_main():
        print(
            f"task {t + 1} ({key}): {tail} examples per epoch skipped (last batch smaller than {run.world} processes)"
        )
    total = cfg.epochs * (len(examples) // cfg.batch_size + (tail >= run.world))
    bar = tqdm(
        total=total, desc=f"task {t + 1}/{len(run.tasks)} {key}", disable=None if is_main() else True, leave=False
    )
    log = StepLog(run.dir.log if is_main() else lambda record: None, f"task {t + 1} ({key})", bar)
    run.model.train()
    steps = (
        batch
        for epoch in range(cfg.epochs)
        for batch in batches(examples, cfg.batch_size, cfg.seed * 1000 + t * 100 + epoch, run.world)
    )
    for step, batch in enumerate(steps):
        loss, extra = train_step(run, batch)
        lr = cosine_lr(step, total, max(1, round(cfg.warmup_ratio * total)), cfg.lr)
        optimizer_step(opt, params, lr, cfg.clip_norm)
        shown = torch.stack([loss, *extra.values()])
        if run.world > 1:  # the task loss: a sum of shares; DDP's terms: equal on every rank; FSDP2's: shards
            dist.all_reduce(shown)
            shown /= torch.tensor([run.world] + [1 if cfg.shard else run.world] * len(extra), device=shown.device)
        values = dict(zip(["task_loss", *extra], shown))
        log.add({"task": key, "step": step + 1, "lr": lr}, {"loss": sum(values.values()), **values})
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
        examples = chunk[run.rank :: run.world]  # empty: a stand-in forward that counts nothing (FSDP2's steps)
        batch = llava_wrap.to_device(run.collate.train(examples or chunk[:1]), run.device)
        with autocast(run.cfg, run.device):
            embeds, attention = llava_wrap.inputs(run.bundle, batch)
            mask = run.collate.counted(batch, run.cfg.importance_tokens) & bool(examples)
            with track_importance(run.bundle.model, token_mask=F.pad(mask, (embeds.shape[1] - mask.shape[1], 0))):
                run.bundle.model(inputs_embeds=embeds, attention_mask=attention)  # prepended prompts count as padding


# ---- evaluation ----


@torch.no_grad()
def evaluate_task(run: Run, task: data.Task) -> tuple[float, list[dict]] | None:
    """Greedy answers on the task's test set, each rank its share of the batches, scored by rank 0 with the
    benchmark's scorer (rows in the test set's order; None on the other ranks). The method may pick the
    experts of each batch (method.evaluating)."""
    index = {ex: i for i, ex in enumerate(task.test)}
    batches = run.collate.by_length(task.test, run.cfg.eval_batch_size)
    replies = {}
    for examples in tqdm(
        lockstep(batches, run.rank, run.world),
        desc=f"evaluating {task.key}",
        leave=False,
        disable=None if is_main() else True,
    ):
        work = examples or batches[0]  # a stand-in keeps FSDP2's collectives in step; its replies are dropped
        with autocast(run.cfg, run.device), run.method.evaluating(work):
            batch = llava_wrap.to_device(run.collate.prompts(work), run.device)
            answers = llava_wrap.generate(run.bundle, batch, run.cfg.max_new_tokens, synced=run.cfg.shard)
        replies |= {index[ex]: text for ex, text in zip(examples or [], answers)}
    replies = {i: text for part in gather(replies) for i, text in part.items()}
    return evaluate.score_rows(task.key, task.test, [replies[i] for i in range(len(task.test))]) if is_main() else None


def probe_gates(run: Run, task: data.Task) -> dict[str, torch.Tensor]:
    """The gates of every PASs layer on the first --probe-size test items, for the router-drift analysis
    (computed on every rank, in step; rank 0 keeps them)."""
    examples = task.test[: run.cfg.probe_size]
    run.bundle.model.eval()
    with autocast(run.cfg, run.device), run.method.evaluating(examples):
        return llava_wrap.mixture_weights(run.bundle, llava_wrap.to_device(run.collate.train(examples), run.device))


def evaluate_after(run: Run, state: dict, t: int) -> None:
    """Row t of the accuracy matrix, the probes' gates, the row printed (every rank evaluates, rank 0 writes)."""
    start, task, last = time.time(), run.tasks[t], t == len(run.tasks) - 1
    trained = state["trained"][t]
    for j in [] if not trained else range(t + 1) if run.cfg.eval == "full" or last else [t]:
        if (scored := evaluate_task(run, run.tasks[j])) is not None:
            state["R"][t][j], rows = scored
            with open(run.dir.path / "predictions" / f"after{t + 1}_{run.tasks[j].key}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    for probed, when in [(task, "after")] * trained + [(old, "final") for old in run.tasks] * last:
        gates = probe_gates(run, probed)
        if is_main():
            torch.save(gates, run.dir.path / "gates" / f"{probed.key}_{when}.pt")
    identified = run.method.task_id_accuracy()  # HiDe-LLaVA, DDAS; every rank: its share of the test items
    if not is_main():
        return
    state["evaluated"] = t + 1
    state["eval_s"].append(round(time.time() - start, 2))
    if identified is not None:  # kept with the state, which survives a resume
        state["task_id_accuracy"] = identified
    run.dir.save_state(state)
    row = " ".join("    -" if v is None else f"{v:5.1f}" for v in state["R"][t])
    cut = run.cut.get(task.key)
    cut = f"; {cut['sequences']} of {cut['of']} training sequences cut at --max-length" if cut else ""
    what = f"{state['train_s'][t]:.0f}s train" if trained else f"{run.cfg.method} trains at the end"
    print(f"after task {t + 1} ({task.key}, {what}{cut}): {row}")


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
    llava_wrap.save_task(run.bundle.model, run.method.state_dict(), run.dir.path / "ckpt", t + 1, run.tasks[t].key)
    if is_main():
        state["completed"] = t + 1
        run.dir.save_state(state)  # trained and saved: a crash in the evaluation below does not retrain it
        for old in ("task", "method") if run.cfg.keep_checkpoints == "last" else ():  # resume needs the newest
            (run.dir.path / "ckpt" / f"{old}{t}.safetensors").unlink(missing_ok=True)  # once the state says so
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
        if cfg.dry_run:
            sys.exit(config.dry_run(cfg))
        run(cfg, resume)
        if dist.is_initialized():
            dist.barrier()  # rank 0 writes the report alone: no rank leaves while another still uses the group
    except (
        data.DataError,
        llava_wrap.ModelError,
        RunDirError,
    ) as err:  # the inputs, not the code: said without a traceback
        sys.exit(f"train_stream.py: error: {err}")
    finally:
        if dist.is_initialized():
            gc.collect()  # the bundle and the method refer to each other: free them while the group is whole
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
