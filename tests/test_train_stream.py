"""train_stream.py end to end on two-task sanity streams.

LEARN is a stream that learns and pads: a tiny base pretrained for 300 steps, then fomc (its
statements differ in length, so batches carry padding) and art; cells of its matrix are well
above 0. The pipeline tests that compare runs (same seed, resume, DDP) use it, so that a
resume that does not load the adapters or an optimizer carried across tasks shows. SMALL, a
barely pretrained base, is for the tests that only need the machinery to run."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from helpers import SMALL, free_port, only_read, two_processes
from safetensors.torch import load_file

import config
import data
import llava_wrap
import train_stream as ts
from engine.runs import RunDir, logged_task

ROOT = Path(__file__).resolve().parent.parent
LEARN = [
    "--order",
    "fomc,art",
    "--n-train",
    "32",
    "--n-test",
    "8",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--max-new-tokens",
    "24",
    "--eval-batch-size",
    "8",
    "--probe-size",
    "2",
    "--tiny-pretrain-steps",
    "300",
    "--num-experts",
    "3",
    "--rank",
    "2",
    "--lr",
    "5e-3",
]
STEPS = 8  # per task of LEARN: 32 items / batch 8 x 2 epochs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Both tiny bases built once, before any run: every run then loads its base from disk
    (one code path), rather than the first run training it in memory."""
    path = str(tmp_path_factory.mktemp("cache"))
    for argv in (SMALL, LEARN):
        config.load_model(ts.parse_args(argv + ["--cache-dir", path])[0], torch.device("cpu"))
    return path


def small(cache, out, *extra):
    cfg, _ = ts.parse_args(only_read(SMALL + ["--cache-dir", cache, "--out", str(out), *extra]))
    return cfg


def learn(cache, out, *extra):
    cfg, _ = ts.parse_args(only_read(LEARN + ["--cache-dir", cache, "--out", str(out), *extra]))
    return cfg


def crash_at_step(monkeypatch, cfg, step):
    """Run cfg and kill it (KeyboardInterrupt) at training step `step`, counted over the run."""
    real_loss, calls = ts.task_loss, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ts, "task_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        ts.run(cfg)
    monkeypatch.setattr(ts, "task_loss", real_loss)


def assert_checkpoints_close(a_path, b_path, keys=None):
    """Two runs of one code path on one machine: equal up to float noise. The tolerance, 1e-4
    of each tensor's scale, is far below what the planted bugs move (a resume that does not
    load the adapters, AdamW carried across tasks: several % of the scale)."""
    a, b = load_file(a_path), load_file(b_path)
    assert set(a) == set(b)
    for key in keys or a:
        diff, scale = (a[key] - b[key]).abs().max().item(), b[key].abs().max().item()
        assert diff <= 1e-4 * scale + 1e-9, (key, diff, scale)


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    ts.run(learn(cache, out))
    return out


def test_the_learning_stream_learns_and_pads(reference_run, cache):
    # guards the guards: a stream that learns nothing or has no padding tests nothing
    R = json.loads((reference_run / "matrix.json").read_text())["R"]
    assert R[0][0] >= 25 and R[1][1] >= 25, R
    cfg = learn(cache, None)
    bundle = config.load_model(cfg, torch.device("cpu"))
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    fomc = config.load_tasks(cfg)[0]
    mask = collate.train(fomc.train[:8])["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) != mask.shape[1]).sum() >= 2


def test_run_directory_contents(reference_run):
    files = {p.relative_to(reference_run).as_posix() for p in reference_run.rglob("*") if p.is_file()}
    for name in [
        "config.json",
        "log.jsonl",
        "matrix.json",
        "metrics.json",
        "report.md",
        "state.json",
        "ckpt/task1.safetensors",
        "ckpt/task2.safetensors",
        "predictions/after1_fomc.jsonl",
        "predictions/after2_fomc.jsonl",
        "predictions/after2_art.jsonl",
        "gates/fomc_after.pt",
        "gates/art_final.pt",
    ]:
        assert name in files, name
    config = json.loads((reference_run / "config.json").read_text())
    for key in (
        "method",
        "seed",
        "lr",
        "pas_config",
        "versions",
        "commit",
        "device_name",
        "base",
        "tasks",
        "cpu",
        "cpu_capability",
        "threads",
    ):  # planted bug: what the numbers depend on left out of the config
        assert key in config, key
    assert config["pas_config"]["stabilize"] and config["threads"] == torch.get_num_threads()
    matrix = json.loads((reference_run / "matrix.json").read_text())
    assert matrix["tasks"] == ["fomc", "art"] and matrix["R"][0][1] is None
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert set(metrics) >= {"ap", "bwt", "bwt_standard", "forget", "final", "train_s", "eval_s"}
    log = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in log] == ["fomc"] * STEPS + ["art"] * STEPS
    assert log[0]["stab"] == 0 and log[-1]["stab"] > 0  # no anchor before the first task ends
    preds = [json.loads(line) for line in (reference_run / "predictions/after2_art.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and set(preds[0]) == {"question_id", "prompt", "text", "reference", "score"}


def test_same_seed_same_matrix(reference_run, cache, tmp_path):
    # planted bugs: a seed that does not reach the data order or the adapters' init
    ts.run(learn(cache, tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "matrix.json").read_text())
    assert again == json.loads((reference_run / "matrix.json").read_text())  # scores: discrete
    assert_checkpoints_close(
        tmp_path / "again" / "ckpt" / "task2.safetensors", reference_run / "ckpt" / "task2.safetensors"
    )


def test_resume_after_a_crash_in_a_task_equals_an_uninterrupted_run(reference_run, cache, tmp_path, monkeypatch):
    # planted bugs: resume that does not load the adapters (or the anchors and importance),
    # and AdamW carried across tasks (the resumed run starts task 2 with a fresh one)
    out = tmp_path / "crashed"
    crash_at_step(monkeypatch, learn(cache, out), STEPS + 2)  # the second step of task 2
    assert json.loads((out / "state.json").read_text())["completed"] == 1

    cfg, resume = ts.parse_args(["--resume", str(out)])
    ts.run(cfg, resume)
    assert json.loads((out / "matrix.json").read_text()) == json.loads((reference_run / "matrix.json").read_text())
    assert_checkpoints_close(out / "ckpt" / "task2.safetensors", reference_run / "ckpt" / "task2.safetensors")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in log] == ["fomc"] * STEPS + ["art"] * STEPS  # the interrupted attempt is not kept


def test_resume_drops_a_log_line_that_a_kill_cut_short():
    # planted bug: json.loads on every line (a SIGKILL mid-task leaves half a line; resume then failed)
    assert logged_task('{"task": "fomc", "step": 3}') == "fomc" and logged_task('{"task": "fo') is None


def test_nan_loss_stops_with_a_clear_message(cache, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_loss, calls = ts.task_loss, []

    def nan_in_task_two(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(ts, "task_loss", nan_in_task_two)
    with pytest.raises(FloatingPointError, match=r"task 2 \(art\) at step 1"):
        ts.run(small(cache, out))
    assert json.loads((out / "state.json").read_text())["completed"] == 1
    assert load_file(out / "ckpt" / "task1.safetensors")  # the last completed task's checkpoint is intact
    assert not (out / "ckpt" / "task2.safetensors").exists()
    assert not list((out / "ckpt").glob(".*"))  # no temporary files left behind


def test_command_line_precedence_and_errors(tmp_path):
    cfg, _ = ts.parse_args(["--recipe", "paper", "--model", "some/llava", "--lr", "1e-4"])
    assert (cfg.rank, cfg.num_experts, cfg.alpha, cfg.lr, cfg.batch_size, cfg.dtype) == (
        128,
        6,
        256.0,
        1e-4,
        12,
        "bfloat16",
    )
    with pytest.raises(SystemExit):
        ts.parse_args(["--recipe", "paper"])  # the 7B recipe on the tiny model
    with pytest.raises(SystemExit):
        ts.parse_args(["--resume", str(tmp_path), "--lr", "1"])
    seq = config.adapters(ts.parse_args(["--method", "seqlora", "--num-experts", "4", "--rank", "3"])[0])[0]
    assert (seq.num_experts, seq.rank) == (1, 12)
    assert seq.alpha / seq.rank == 8.0 / 3  # alpha x E: the same scaling alpha / r as E experts of rank 3
    split, layer = config.adapters(
        ts.parse_args(["--method", "moelora", "--num-experts", "4", "--total-rank", "16"])[0]
    )
    assert (split.num_experts, split.rank, layer.func.__name__) == (4, 4, "RoutedMoELinear")
    with pytest.raises(SystemExit):
        ts.parse_args(["--num-experts", "3", "--total-rank", "16"])


@pytest.fixture(scope="module")
def small_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    ts.run(small(cache, out))
    return out


def test_two_process_gloo_run_matches_one_process(small_run, tmp_path):
    # also from an empty cache: under torchrun rank 0 builds the base and rank 1 waits for it
    # (planted bug: both build, and one fails to move its copy into place)
    out = tmp_path / "ddp"
    done = two_processes([*SMALL, "--cache-dir", str(tmp_path / "empty-cache"), "--out", str(out)], timeout=240)
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert done.stdout.count("building the pretrained tiny base") == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (small_run / "log.jsonl").read_text().splitlines()]
    # the logged task loss is the global mean, not rank 0's share (planted bug: half of it)
    assert [r["task_loss"] for r in log] == pytest.approx([r["task_loss"] for r in one_log], rel=1e-2)
    two, one = load_file(out / "ckpt" / "task2.safetensors"), load_file(small_run / "ckpt" / "task2.safetensors")
    for key in one:
        if key.endswith(("importance_agg", "anchor_A", "anchor_B")):
            # Two ranks sum gradients in another order than one process; Adam turns tiny
            # differences in near-zero gradients into visible ones, so the tolerance is 0.1% of
            # the tensor's scale. Planted bugs (no all-reduce of the importance sums, the loss
            # not scaled by world) differ by a factor of about 2.
            diff, scale = (two[key] - one[key]).abs().max().item(), one[key].abs().max().item()
            assert diff <= 1e-3 * scale + 1e-8, (key, diff, scale)


@pytest.mark.parametrize("method", ["l2p", "seqft"])
def test_two_processes_train_what_a_method_adds_or_unfreezes_as_one_does(cache, tmp_path, method):
    # planted bugs: DDP wrapping the model before the method adds its prompt pool or unfreezes the
    # language model (their gradients are then never averaged: the ranks drift apart from one
    # process); the projector, trained by seqft, left out of the graph on a text-only batch (DDP
    # then stops at the second step of numglue); L2P's pull averaged within each rank's part (batches
    # of 5 split 3 and 2: the items of the smaller part then weigh 1/4 instead of 1/5)
    one, two = tmp_path / "one", tmp_path / "two"
    uneven = ["--batch-size", "5", "--n-train", "15"] if method == "l2p" else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: only the split of the batch differs
    try:
        ts.run(small(cache, one, "--method", method, *uneven))
    finally:
        torch.set_num_threads(threads)
    two_processes([*only_read(SMALL + ["--method", method, *uneven]), "--cache-dir", cache, "--out", str(two)])
    a, b = load_file(two / "ckpt" / "task2.safetensors"), load_file(one / "ckpt" / "task2.safetensors")
    assert set(a) == set(b) and any(k.startswith(("l2p_pool.", "model.language_model.")) for k in a)
    for key in a:  # the batch split changes summation order: measured up to 0.08% of a tensor's
        # scale (L2P's prompts, which Adam moves far on few steps); a missing all-reduce would move the
        # weights by a good part of their training update, so 1% still tells the two apart
        diff, scale = (a[key] - b[key]).abs().max().item(), b[key].abs().max().item()
        assert diff <= 1e-2 * scale + 1e-8, (key, diff, scale)


@pytest.mark.parametrize(
    "method,term",
    [
        ("ewc", "consolidation"),
        ("mas", "consolidation"),
        ("lwf", "distill"),
        ("olora", "orthogonal"),
        ("replay", None),
        ("joint", None),
        ("seqft", None),
        ("l2p", "pull"),
        ("hide", None),
        ("ddas", None),
    ],
)
def test_every_method_runs_and_logs_its_terms(cache, tmp_path, method, term):
    # planted bugs: a method whose extra term never switches on after the first task (L2P's pull
    # is on from the start), or whose run directory lacks the usual files
    out = tmp_path / method
    ts.run(small(cache, out, "--method", method))
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if method == "joint":  # trains once, on both tasks' items: 32 / batch 8 = 4 steps at the last task
        assert metrics["bwt"] is None and [r["task"] for r in log] == ["art"] * 4
        return
    assert metrics["bwt"] is not None and [r["task"] for r in log] == ["numglue"] * 2 + ["art"] * (
        2 if method != "replay" else 3
    )
    if term == "pull":
        assert all(r["pull"] < 0 for r in log)
    elif term:
        assert log[0][term] == 0 and log[-1][term] > 0
    assert ("task_id_accuracy" in metrics) == (method in ("hide", "ddas"))


@pytest.mark.parametrize("method", ["ewc", "hide", "ddas"])
def test_resume_restores_the_methods_own_state(cache, tmp_path, monkeypatch, method):
    # planted bugs: a method's own state (EWC's Fisher and anchors, HiDe's anchors, DDAS's
    # autoencoders and thresholds) not saved or not loaded on resume: the penalty is then 0, or
    # the resumed run picks other experts than an uninterrupted one
    reference = tmp_path / "ref"
    ts.run(small(cache, reference, "--method", method))
    out = tmp_path / "crashed"
    crash_at_step(monkeypatch, small(cache, out, "--method", method), 3)  # in task 2
    ts.run(*ts.parse_args(["--resume", str(out)]))
    assert json.loads((out / "matrix.json").read_text()) == json.loads((reference / "matrix.json").read_text())
    assert_checkpoints_close(out / "ckpt" / "method2.safetensors", reference / "ckpt" / "method2.safetensors")
    if method == "ewc":
        a = [json.loads(line)["consolidation"] for line in (out / "log.jsonl").read_text().splitlines()]
        b = [json.loads(line)["consolidation"] for line in (reference / "log.jsonl").read_text().splitlines()]
        assert a[3] > 0 and a == pytest.approx(b, rel=1e-4)  # a[2]: the first step of task 2, at the anchor
    else:
        assert (
            json.loads((out / "metrics.json").read_text())["task_id_accuracy"]
            == json.loads((reference / "metrics.json").read_text())["task_id_accuracy"]
        )


def a_run(cfg, tasks=None) -> ts.Run:
    """A Run around the model of cfg, as setup builds it, without a run directory or a method."""
    bundle = config.load_model(cfg, torch.device("cpu"))
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    return ts.Run(
        cfg,
        RunDir(cfg.out),
        0,
        1,
        torch.device("cpu"),
        tasks or config.load_tasks(cfg),
        bundle,
        bundle.model,
        collate,
        None,
        {},
    )


def test_importance_pass_counts_each_real_token_once(cache):
    # planted bug: the importance pass without the token mask (padding tokens counted); the
    # reference feeds one item at a time, so there is no padding to get wrong
    from pasmoe import pas_layers, track_importance

    run = a_run(learn(cache, None))
    bundle, collate = run.bundle, run.collate
    fomc = run.tasks[0]
    fomc = data.Task(fomc.key, fomc.train[:16], fomc.test)
    layers = pas_layers(bundle.model).values()
    ts.importance_pass(run, fomc)  # batches of 8, padded
    batched = [(layer.task_importance_sum.clone(), layer.task_tokens.item()) for layer in layers]
    for layer in layers:
        layer.task_importance_sum.zero_()
        layer.task_tokens.zero_()
    with torch.no_grad():
        for ex in fomc.train:
            with track_importance(bundle.model):
                ts.llava_wrap.forward(bundle, collate.train([ex]))
    for (total, tokens), layer in zip(batched, layers):
        assert tokens == layer.task_tokens.item()
        assert torch.allclose(total, layer.task_importance_sum, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("which", ["text", "answer"])
def test_importance_tokens_option_counts_what_it_says(cache, which):
    # planted bugs: "text" still counting image tokens, "answer" counting the prompt
    run = a_run(learn(cache, None, "--importance-tokens", which))
    bundle, collate = run.bundle, run.collate
    art = run.tasks[1]  # image task
    art = data.Task(art.key, art.train[:8], art.test)
    ts.importance_pass(run, art)
    batch = collate.train(art.train)
    attended = batch["attention_mask"].bool()
    expected = {
        "text": attended & (batch["input_ids"] != bundle.model.config.image_token_index),
        "answer": attended & (batch["labels"] != data.IGNORE),
    }[which]
    assert 0 < expected.sum() < attended.sum()
    from pasmoe import pas_layers

    assert {layer.task_tokens.item() for layer in pas_layers(bundle.model).values()} == {expected.sum().item()}


def test_data_parallel_does_not_broadcast_buffers(monkeypatch):
    # planted bug: broadcast_buffers=True re-sends the adapter-sized anchors every step
    import torch.distributed as dist

    from pasmoe import PASsConfig, inject

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        inject(model, PASsConfig(num_experts=2, rank=2), target=r"^0$")
        from engine.processes import data_parallel

        ddp = data_parallel(model, torch.device("cpu"))
        assert ddp.broadcast_buffers is False and getattr(ddp, "forward_sync_buffers", False) is False
    finally:
        dist.destroy_process_group()


def test_task_loss_casts_only_the_answer_logits_to_fp32():
    # planted bug: logits.float() before slicing (2.4 GB at the 7B recipe's batch). Every fp32
    # tensor any op produces is recorded, saved for backward or not.
    from torch.utils._python_dispatch import TorchDispatchMode

    b, n, V = 2, 40, 50
    logits = torch.randn(b, n, V, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((b, n), data.IGNORE)
    labels[:, -3:] = 7  # three answer tokens per sequence
    fp32 = []

    class RecordFp32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fp32.extend(
                t.numel()
                for t in (out if isinstance(out, (tuple, list)) else [out])
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32
            )
            return out

    with RecordFp32():
        loss = ts.task_loss(logits, labels, 6, 1)
    assert max(fp32) <= 6 * V < b * n * V
    ref = (
        torch.nn.functional.cross_entropy(
            logits.float()[:, -4:-1].reshape(-1, V), labels[:, -3:].reshape(-1), reduction="sum"
        )
        / 6
    )
    assert torch.allclose(loss, ref)


@pytest.mark.parametrize("method", ["hide", "ddas"])
def test_task_experts_train_only_the_current_tasks_expert(cache, tmp_path, method):
    # planted bug: the gate left to the energy softmax in training (every expert moves in every task)
    out = tmp_path / method
    ts.run(small(cache, out, "--method", method))
    first, second = load_file(out / "ckpt" / "task1.safetensors"), load_file(out / "ckpt" / "task2.safetensors")
    config = json.loads((out / "config.json").read_text())["pas_config"]
    assert config["num_experts"] == 2 and config["rank"] == 3  # 3 experts x rank 2 = 6, split over 2 tasks
    for key in (k for k in first if k.endswith(("lora_A", "lora_B"))):
        assert torch.equal(first[key][0], second[key][0]), key  # task 1's expert did not move in task 2
    moved = [k for k in first if k.endswith(("lora_A", "lora_B")) and not torch.equal(first[k][1], second[k][1])]
    assert len(moved) == sum(k.endswith(("lora_A", "lora_B")) for k in first)  # and task 2's did, everywhere


def test_seqft_resume_restores_the_full_weights(cache, tmp_path, monkeypatch):
    # planted bug: checkpoints that hold only adapters (seqft has none: a resumed run would start
    # task 2 from the pretrained language model)
    reference = tmp_path / "ref"
    ts.run(small(cache, reference, "--method", "seqft"))
    out = tmp_path / "crashed"
    crash_at_step(monkeypatch, small(cache, out, "--method", "seqft"), 3)  # in task 2
    ts.run(*ts.parse_args(["--resume", str(out)]))
    saved = load_file(out / "ckpt" / "task1.safetensors")
    assert any(k.startswith("model.language_model.layers.") for k in saved) and "lm_head.weight" in saved
    assert_checkpoints_close(out / "ckpt" / "task2.safetensors", reference / "ckpt" / "task2.safetensors")


def test_l2p_prompts_reach_generation_in_prefill_and_every_decode_step(cache):
    # planted bugs: prompts skipped when generating (the benchmark's L2P.py, whose answers are then
    # the frozen base's), or seen by the first step only; each step's scores must equal a forward
    # of the whole sequence with the prompts in front, and differ from the scores without them
    cfg = learn(cache, None, "--method", "l2p")
    bundle = config.load_model(cfg, torch.device("cpu"))
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    tasks = config.load_tasks(cfg)
    passes = llava_wrap.passes(bundle, collate, torch.device("cpu"), 8, contextlib.nullcontext)
    method = ts.METHODS["l2p"].cls(cfg, bundle.model, tasks, *passes)
    batch = collate.prompts(tasks[0].test[:1])

    def scores():
        embeds, mask = llava_wrap.inputs(bundle, batch)
        out = bundle.model.eval().generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=bundle.tokenizer.pad_token_id,
            eos_token_id=None,
        )
        return out.sequences[0], torch.stack(out.scores)[:, 0]

    with torch.no_grad():
        _, plain = scores()
        bundle.input_hook = method.inputs
        tokens, prompted = scores()
        assert (plain - prompted).abs().amax(dim=1).min() > 1e-2  # every step sees the prompts
        for k in range(len(tokens)):
            grown = {
                "input_ids": torch.cat([batch["input_ids"], tokens[:k].unsqueeze(0)], 1),
                "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + k, dtype=torch.long),
                "examples": batch["examples"],
            }
            assert torch.allclose(llava_wrap.forward(bundle, grown)[0, -1], prompted[k], atol=1e-3), k


def test_a_one_task_order_runs_and_is_analysed(cache, tmp_path, capsys):
    # planted bug: a division by the number of old tasks (none: the ZeroDivisionError a one-task order met
    # after its matrix was written)
    from lab import analyses

    out = tmp_path / "one"
    ts.run(small(cache, out, "--order", "numglue"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bwt"] == 0.0 and metrics["ap"] == metrics["final"][0]
    analyses.main([str(out)])
    assert "router drift" not in capsys.readouterr().out.split(str(out))[-1]  # no old task, so no drift
