"""train_stream.py end to end on a two-task sanity stream with a barely pretrained tiny base."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_stream as ts

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--order", "numglue,art", "--n-train", "16", "--n-test", "4", "--epochs", "1", "--batch-size", "8",
         "--max-new-tokens", "8", "--eval-batch-size", "8", "--probe-size", "2", "--tiny-pretrain-steps", "3",
         "--num-experts", "3", "--rank", "2", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def small(cache, out, *extra):
    cfg, _, _ = ts.parse_args(SMALL + ["--cache-dir", cache, "--out", str(out), *extra])
    return cfg


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    ts.run(small(cache, out))
    return out


def test_run_directory_contents(reference_run):
    files = {p.relative_to(reference_run).as_posix() for p in reference_run.rglob("*") if p.is_file()}
    for name in ["config.json", "log.jsonl", "matrix.json", "metrics.json", "report.md", "state.json",
                 "ckpt/task1.safetensors", "ckpt/task2.safetensors", "predictions/after1_numglue.jsonl",
                 "predictions/after2_numglue.jsonl", "predictions/after2_art.jsonl",
                 "gates/numglue_after.pt", "gates/art_final.pt"]:
        assert name in files, name
    config = json.loads((reference_run / "config.json").read_text())
    for key in ("method", "seed", "lr", "pas_config", "versions", "commit", "device_name", "base", "tasks"):
        assert key in config, key
    assert config["pas_config"]["gate"] == "pas" and config["pas_config"]["reg"] == "pas"
    matrix = json.loads((reference_run / "matrix.json").read_text())
    assert matrix["tasks"] == ["numglue", "art"] and matrix["R"][0][1] is None
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert set(metrics) >= {"ap", "bwt", "bwt_standard", "forget", "final", "train_s", "eval_s"}
    log = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in log] == ["numglue"] * 2 + ["art"] * 2  # 16 items / batch 8, one epoch
    assert log[0]["stab"] == 0 and log[-1]["stab"] > 0  # no anchor before the first task ends
    preds = [json.loads(line) for line in (reference_run / "predictions/after2_art.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and set(preds[0]) == {"id", "prediction", "reference", "score"}


def test_same_seed_same_matrix(reference_run, cache, tmp_path):
    ts.run(small(cache, tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "matrix.json").read_text())
    assert again == json.loads((reference_run / "matrix.json").read_text())
    a = load_file(tmp_path / "again" / "ckpt" / "task2.safetensors")
    b = load_file(reference_run / "ckpt" / "task2.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_in_a_task_equals_an_uninterrupted_run(reference_run, cache, tmp_path, monkeypatch):
    out = tmp_path / "crashed"
    real_loss, calls = ts.task_loss, []

    def crash_in_task_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # task 1 has 2 steps; this is the second step of task 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ts, "task_loss", crash_in_task_two)
    with pytest.raises(KeyboardInterrupt):
        ts.run(small(cache, out))
    monkeypatch.setattr(ts, "task_loss", real_loss)
    assert json.loads((out / "state.json").read_text())["completed"] == 1

    cfg, resume, _ = ts.parse_args(["--resume", str(out)])
    ts.run(cfg, resume)
    assert json.loads((out / "matrix.json").read_text()) == json.loads((reference_run / "matrix.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["task"] for r in log] == ["numglue"] * 2 + ["art"] * 2  # the interrupted attempt is not kept


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
    cfg, _, _ = ts.parse_args(["--recipe", "paper", "--model", "some/llava", "--lr", "1e-4"])
    assert (cfg.rank, cfg.num_experts, cfg.alpha, cfg.lr, cfg.batch_size, cfg.dtype) == (128, 6, 256.0, 1e-4, 12, "bfloat16")
    with pytest.raises(SystemExit):
        ts.parse_args(["--recipe", "paper"])  # the 7B recipe on the tiny model
    with pytest.raises(SystemExit):
        ts.parse_args(["--resume", str(tmp_path), "--lr", "1"])
    seq = ts.parse_args(["--method", "seqlora", "--num-experts", "4", "--rank", "3"])[0].pas_config()
    assert (seq.num_experts, seq.rank, seq.gate) == (1, 12, "single")
    split = ts.parse_args(["--method", "moelora", "--num-experts", "4", "--total-rank", "16"])[0].pas_config()
    assert (split.num_experts, split.rank, split.gate) == (4, 4, "softmax")
    with pytest.raises(ValueError, match="does not split"):
        ts.parse_args(["--num-experts", "3", "--total-rank", "16"])[0].pas_config()


def test_two_process_gloo_run_matches_one_process(reference_run, cache, tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "train_stream.py"), *SMALL, "--cache-dir", cache, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    two, one = load_file(out / "ckpt" / "task2.safetensors"), load_file(reference_run / "ckpt" / "task2.safetensors")
    for key in one:
        if key.endswith(("importance_agg", "anchor_A", "anchor_B")):
            # Two ranks sum gradients in another order than one process; Adam turns tiny
            # differences in near-zero gradients into visible ones, so the tolerance is 0.1% of
            # the tensor's scale. Planted bugs (no all-reduce of the importance sums, the loss
            # not scaled by world) differ by a factor of about 2.
            diff, scale = (two[key] - one[key]).abs().max().item(), one[key].abs().max().item()
            assert diff <= 1e-3 * scale + 1e-8, (key, diff, scale)


@pytest.mark.parametrize("method,term", [("ewc", "consolidation"), ("mas", "consolidation"), ("lwf", "distill"),
                                         ("olora", "orthogonal"), ("replay", None), ("joint", None)])
def test_every_method_runs_and_logs_its_terms(cache, tmp_path, method, term):
    # planted bugs: a method whose extra term never switches on after the first task, or whose
    # run directory lacks the usual files
    out = tmp_path / method
    ts.run(small(cache, out, "--method", method))
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if method == "joint":  # trains once, on both tasks' items: 32 / batch 8 = 4 steps at the last task
        assert metrics["bwt"] is None and [r["task"] for r in log] == ["art"] * 4
        return
    assert metrics["bwt"] is not None and [r["task"] for r in log] == ["numglue"] * 2 + ["art"] * (2 if method != "replay" else 3)
    if term:
        assert log[0][term] == 0 and log[-1][term] > 0


def test_resume_restores_the_methods_own_state(cache, tmp_path, monkeypatch):
    # planted bug: EWC's Fisher and anchors not saved or not loaded on resume (the penalty is
    # then 0 for the rest of the run)
    reference = tmp_path / "ref"
    ts.run(small(cache, reference, "--method", "ewc"))
    out = tmp_path / "crashed"
    real_loss, calls = ts.task_loss, []

    def crash_in_task_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ts, "task_loss", crash_in_task_two)
    with pytest.raises(KeyboardInterrupt):
        ts.run(small(cache, out, "--method", "ewc"))
    monkeypatch.setattr(ts, "task_loss", real_loss)
    ts.run(*ts.parse_args(["--resume", str(out)])[:2])
    a = [json.loads(line)["consolidation"] for line in (out / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line)["consolidation"] for line in (reference / "log.jsonl").read_text().splitlines()]
    assert a[3] > 0 and a == pytest.approx(b, rel=1e-4)  # a[2]: the first step of task 2, at the anchor
