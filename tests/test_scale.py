"""The 7B recipe's machinery on CPU: each rank's device, micro-batches and any number of processes, FSDP2
(--shard) against one process, a sharded run resumed, evaluation shared by the ranks, bounded task-end
passes, checkpoints, the shared-filesystem check, and the memory plan (--dry-run) on the meta device.

Two-process runs use gloo on CPU with one thread per rank, and compare with a one-process reference run on
one thread: only how the batch is split differs, which changes the order of sums (DDP's tests measured
differences up to 0.08% of a tensor's scale), while the planted bugs move weights by a good part of their
update. The tolerance is 0.3% of each tensor's scale."""

import json
import shutil
from pathlib import Path

import pytest
import realformat as rf
import torch
from helpers import SMALL, only_read, two_processes
from safetensors.torch import load_file

import config
import llava_wrap
import train_stream as ts
from engine import memory, processes
from engine.runs import RunDir, RunDirError
from engine.steps import micro_batches

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    config.load_model(ts.parse_args(SMALL + ["--cache-dir", path])[0], torch.device("cpu"))
    return path


def args(cache, out, *extra):
    return only_read(SMALL + ["--cache-dir", cache, "--out", str(out), *extra])


def one_process(cache, out, *extra):
    """The reference: one process on one thread, as each rank of a two-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ts.run(ts.parse_args(args(cache, out, *extra))[0])
    finally:
        torch.set_num_threads(threads)


def assert_close(a_path, b_path, tolerance=3e-3):
    a, b = load_file(a_path), load_file(b_path)
    assert set(a) == set(b)
    for key in a:
        diff, scale = (a[key] - b[key]).abs().max().item(), b[key].abs().max().item()
        assert diff <= tolerance * scale + 1e-8, (key, diff, scale)


# ---- processes and micro-batches ----


def test_each_rank_takes_its_own_gpu_before_the_first_collective(monkeypatch):
    # planted bug: no set_device (every rank's NCCL calls then run on GPU 0: "Duplicate GPU detected")
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(processes.dist, "is_initialized", lambda: bool(calls and calls[-1][0] == "init"))
    monkeypatch.setattr(
        processes.dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw.get("device_id")))
    )
    monkeypatch.setattr(processes, "rank_world", lambda: (1, 2))
    _, _, device = processes.init_processes(None)
    assert device == torch.device("cuda", 1)
    assert calls == [("set_device", device), ("init", "nccl", device)]


@pytest.mark.parametrize("world,size", [(1, None), (1, 3), (2, 1), (3, 1), (5, 2), (8, 1), (12, 1)])
def test_micro_batches_split_a_global_batch_exactly_once_for_any_process_count(world, size):
    # planted bugs: items lost or duplicated between ranks, shares that do not add up to one step, ranks
    # with different numbers of micro-batches (DDP and FSDP2 then wait for each other forever)
    batch = list(range(12))
    parts = [micro_batches(batch, rank, world, size) for rank in range(world)]
    assert len({len(p) for p in parts}) == 1
    real = [x for p in parts for items, share in p if share > 0 for x in items]
    assert sorted(real) == batch
    for p in parts:
        assert sum(share for _, share in p) == pytest.approx(1.0) and p[-1][1] > 0  # DDP syncs on the last
        assert all(len(items) <= (size or 12) for items, _ in p)


def test_gradient_accumulation_equals_one_batch(cache, tmp_path):
    # planted bugs: the task loss normalized per micro-batch (each then weighs as a whole step), Eq. 11
    # added at full weight in every micro-batch (k times the penalty), a stand-in micro-batch trained on
    one_process(cache, tmp_path / "whole")
    one_process(cache, tmp_path / "micro", "--micro-batch-size", "3")
    assert_close(
        tmp_path / "micro" / "ckpt" / "task2.safetensors", tmp_path / "whole" / "ckpt" / "task2.safetensors", 1e-3
    )
    log = [json.loads(line) for line in (tmp_path / "micro" / "log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["stab"] for r in log] == pytest.approx([r["stab"] for r in reference], rel=1e-3)


# ---- FSDP2 ----


@pytest.mark.parametrize("method", ["seqft", "ewc"])
def test_a_sharded_run_equals_one_process(cache, tmp_path, method):
    # planted bugs: the root unit left gathered after evaluation (the next task's optimizer then holds the
    # gathered copies and the final norm stops training: task 2 differs by 6% of its scale), the whole
    # parameters' gradients not averaged, the clip ignoring the shards, EWC's Fisher from examples split
    # over the ranks (the reduce-scatter then averages two examples' gradients before they are squared)
    one_process(cache, tmp_path / "one", "--method", method)
    two_processes(args(cache, tmp_path / "two", "--method", method, "--shard", "--micro-batch-size", "2"))
    for name in ("task2", "method2") if method == "ewc" else ("task2",):
        assert_close(
            tmp_path / "two" / "ckpt" / f"{name}.safetensors", tmp_path / "one" / "ckpt" / f"{name}.safetensors"
        )
    if method == "ewc":  # the penalty's value, logged as the sum over the shards
        a = [json.loads(line)["consolidation"] for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
        b = [json.loads(line)["consolidation"] for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
        assert a[-1] > 0 and a == pytest.approx(b, rel=1e-3)


def interrupted_after_task_one(run_dir: Path, copy: Path) -> Path:
    """A copy of a finished two-task run as a crash during task 2 leaves it: task 1 trained, evaluated and
    saved, nothing of task 2."""
    shutil.copytree(run_dir, copy)
    state = json.loads((copy / "state.json").read_text())
    state.update(
        completed=1,
        evaluated=1,
        trained=state["trained"][:1],
        train_s=state["train_s"][:1],
        eval_s=state["eval_s"][:1],
        R=[state["R"][0], [None] * len(state["R"])],
    )
    state.pop("task_id_accuracy", None)
    (copy / "state.json").write_text(json.dumps(state))
    for name in ("task2", "method2"):
        (copy / "ckpt" / f"{name}.safetensors").unlink(missing_ok=True)
    for name in ("matrix.json", "metrics.json"):
        (copy / name).unlink()
    log = [line for line in (copy / "log.jsonl").read_text().splitlines() if json.loads(line)["task"] == "numglue"]
    (copy / "log.jsonl").write_text("".join(line + "\n" for line in log))
    return copy


def test_a_sharded_run_resumes_and_its_checkpoints_load_in_one_process(cache, tmp_path):
    # planted bugs: resume loading the adapters after sharding (their shapes then differ), EWC's Fisher and
    # anchors left whole beside sharded parameters, checkpoints holding one rank's shards only
    full = tmp_path / "full"
    two_processes(args(cache, full, "--method", "ewc", "--shard"))
    resumed = interrupted_after_task_one(full, tmp_path / "resumed")
    two_processes(["--resume", str(resumed)])
    for name in ("task2", "method2"):
        assert_close(resumed / "ckpt" / f"{name}.safetensors", full / "ckpt" / f"{name}.safetensors", 1e-4)
    model = config.load_model(
        ts.parse_args(args(cache, tmp_path / "x", "--method", "ewc"))[0], torch.device("cpu")
    ).model
    llava_wrap.load_adapters(model, full / "ckpt" / "task2.safetensors")  # whole tensors, one process


def test_evaluation_is_shared_by_the_ranks_and_gives_the_predictions_of_one(cache, tmp_path):
    # planted bugs: rank 0 evaluating alone while the others wait (the old way: hours at a 6 h barrier), a
    # rank's replies dropped or placed on other items when gathered
    finished = one_process(cache, tmp_path / "run", "--method", "hide", "--eval-batch-size", "1")  # 2 batches a rank
    for copy in ("one", "two"):
        shutil.copytree(finished, tmp_path / copy)
        state = json.loads((tmp_path / copy / "state.json").read_text())
        state.update(evaluated=1, eval_s=state["eval_s"][:1])  # the last evaluation was interrupted
        state["R"][1] = [None, None]
        (tmp_path / copy / "state.json").write_text(json.dumps(state))
    ts.run(*ts.parse_args(["--resume", str(tmp_path / "one")]))
    two_processes(["--resume", str(tmp_path / "two")])
    for task in ("numglue", "art"):
        rows = [(tmp_path / c / "predictions" / f"after2_{task}.jsonl").read_text() for c in ("one", "two")]
        assert rows[0] == rows[1] and rows[0].count("\n") == 4
    metrics = [json.loads((tmp_path / c / "metrics.json").read_text()) for c in ("one", "two")]
    assert metrics[0]["task_id_accuracy"] == metrics[1]["task_id_accuracy"]  # every rank's items counted


def test_task_end_passes_see_a_bounded_number_of_images_at_once(cache, tmp_path, monkeypatch):
    # planted bug: HiDe's and DDAS's features of a whole task's training set in one call to the vision tower
    # (at 7B, 29 MiB an image: past about 1,500 images it cannot fit)
    seen = []
    real = llava_wrap.vision_features
    monkeypatch.setattr(
        llava_wrap, "vision_features", lambda bundle, examples: seen.append(len(examples)) or real(bundle, examples)
    )
    ts.run(
        ts.parse_args(
            args(
                cache,
                tmp_path / "run",
                "--method",
                "ddas",
                "--order",
                "art,numglue",
                "--eval-batch-size",
                "5",
                "--batch-size",
                "4",
            )
        )[0]
    )
    assert seen and max(seen) <= 5  # 16 training images in one call without the bound


def test_keeping_only_the_last_checkpoint_still_resumes(cache, tmp_path):
    # planted bugs: the newest checkpoint deleted instead of the older, or a method's state left behind
    out = tmp_path / "run"
    ts.run(ts.parse_args(args(cache, out, "--method", "ewc", "--keep-checkpoints", "last"))[0])
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["method2.safetensors", "task2.safetensors"]


def test_a_rank_that_cannot_see_the_run_directory_stops(tmp_path, monkeypatch):
    # planted bug: a rank of another node, without a shared filesystem, silently starts from task 0
    monkeypatch.setattr("engine.runs.rank_world", lambda: (1, 2))
    monkeypatch.setattr("engine.runs.dist.barrier", lambda: None)
    with pytest.raises(RunDirError, match="rank 1 cannot see .* shared filesystem"):
        RunDir(tmp_path / "run").open(None, 2, {})


# ---- the memory plan ----


def llava_7b_files(tmp_path: Path) -> Path:
    """A folder with llava-1.5-7b-hf's config.json and a processor for its 336 px images, and no weights."""
    tiny = rf.make_llava_checkpoint(tmp_path / "tiny")
    folder = tmp_path / "llava-1.5-7b-hf"
    folder.mkdir()
    for f in tiny.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, folder / f.name)
    llava_wrap.llava_15_7b_config().save_pretrained(folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre.update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def test_the_dry_run_plans_the_7b_without_reading_a_weight(tmp_path, capsys):
    # planted bugs: weights read (the folder has none), the adapters or the method's state left out of the
    # count, a setting that cannot fit not refused, or refused without the flag to change
    folder = llava_7b_files(tmp_path)
    bench = rf.make_ctbench(tmp_path / "bench", tasks=("numglue", "art"), n_train=4, n_test=2)
    base = [
        "--recipe",
        "paper",
        "--stream",
        "ctbench",
        "--data-root",
        str(bench),
        "--model",
        str(folder),
        "--order",
        "numglue,art",
        "--dry-run",
        "--gradient-checkpointing",
    ]
    with pytest.raises(SystemExit) as done:
        ts.main(base + ["--gpus", "1", "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "fits" in out and "trained weights (fp32)" in out
    assert "7.15 GiB" in out  # 1,918,894,080 fp32 adapter weights
    with pytest.raises(SystemExit) as done:
        ts.main(base + ["--method", "ewc", "--gpus", "1", "--gpu-memory", "40"])
    out = capsys.readouterr().out
    assert done.value.code == 1 and "does not fit" in out and "--shard on 2 GPUs" in out


def test_recipe_7b_shows_the_table_the_plan_computes_today():
    # planted bugs: a change to the plan or to a method's state (Spec.saved_copies, state_copies) without
    # the table regenerated (python -m lab.recipe --docs RECIPE_7B.md), so the document promises a fit
    # the code no longer computes; seqft's row without --shard although it fits no GPU under DDP
    from lab import recipe

    table = recipe.table()
    assert table in (ROOT / "RECIPE_7B.md").read_text(), (
        "RECIPE_7B.md is stale: python -m lab.recipe --docs RECIPE_7B.md"
    )
    seqft = next(line for line in table.splitlines() if line.startswith("| seqft |"))
    assert "(fits neither)" in seqft and "--method seqft --shard" in seqft


def test_the_plans_activations_match_what_autograd_keeps(tmp_path):
    # planted bug: an activation estimate that misses the MLP's intermediate tensors or the adapters' z
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from pasmoe import PASsConfig, inject
    from pasmoe_fused import FusedPASsMoELinear

    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    layer = LlamaDecoderLayer(text, 0).to(torch.bfloat16)
    inject(layer, PASsConfig(num_experts=4, rank=8), layer_class=FusedPASsMoELinear)
    n = 512
    x = torch.randn(1, n, 128, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = LlamaRotaryEmbedding(text)(x, torch.arange(n).unsqueeze(0))
    kept, skip = {}, {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, position_embeddings=cos_sin, attention_mask=None)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([layer])})
    setting = memory.Setting(1, False, 1, n, False, 1, 1, 0)
    planned = memory.plan(model, text, setting)["activations"] * memory.GIB
    assert 0.75 < planned / sum(kept.values()) < 1.33, (planned, sum(kept.values()))


def test_task_identification_counts_the_items_of_every_rank(monkeypatch):
    # planted bug: the accuracy from rank 0's share of the test items only (each rank identifies its own)
    import baselines

    method = baselines.HiDe.__new__(baselines.HiDe)
    method.hits = {("art", "0"): True, ("art", "1"): True}  # this rank's share
    other = {("art", "2"): False, ("art", "3"): False}  # the other rank's
    monkeypatch.setattr(baselines, "gather", lambda value: [value, other])
    assert method.task_id_accuracy() == {"art": 50.0}
