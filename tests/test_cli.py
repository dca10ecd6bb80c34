"""The command line: every bad flag stops in one line with exit 2, before anything loads; the errors the
project raises on purpose reach the user as one line, not a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--epochs", "-1"], "--epochs -1 must be at least 1"),  # trained nothing, then printed scores
        (["--lr", "-1"], "--lr -1.0 must be greater than 0"),  # a torch traceback after 12 s
        (["--num-experts", "0"], "--num-experts 0 must be at least 1"),
        (["--n-test", "0"], "--n-test 0 must be at least 1"),
        (["--data-root", "somewhere"], "--data-root does nothing in this run: it is read by --stream ctbench"),
        (["--total-rank", "7"], "--total-rank 7 does not split over 6 experts"),
        (["--order", "A,B,zzz"], "A, B, C and D are whole orders"),
        (["--stream", "ctbench", "--data-root", "/no/such/folder"], "needs --data-root DIR, an existing folder"),
        (["--stream", "ctbench"], "needs --data-root DIR"),
        (["--replay-fraction", "0.3"], "--replay-fraction does nothing in this run: it is read by --method replay"),
        (["--method", "seqft", "--rank", "8"], "--rank does nothing in this run: it is read by a method with adapters"),
        (["--method", "moelora", "--lambda-a", "1e-3"], "it is read by a method with Eq. 11"),
        (["--method", "seqlora", "--temperature", "2"], "it is read by a method that mixes experts"),
        (["--method", "moelora-topk", "--top-k", "7"], "--top-k 7 is more than the 6 experts"),
        (["--method", "pasmoe", "--shard"], "--shard: pasmoe runs under DDP only"),
        (["--rank", "4", "--total-rank", "24"], "--rank and --total-rank both given"),
        (["--gpus", "8"], "--gpus does nothing in this run: it is read by --dry-run"),
        (["--method", "olora", "--weight-decay", "0.1"], "olora needs --weight-decay 0"),
        (["--method", "seqlora", "--shard"], "run it with torchrun, or plan it with --dry-run"),  # one process
        (["--method", "seqlora", "--shard", "--train-projector", "--dry-run"], "it trains no projector"),
    ],
)
def test_a_bad_flag_stops_in_one_line_before_anything_loads(argv, says, capsys):
    # planted bugs: a range, an applicability rule or a cross-check removed (the run then starts, trains
    # nothing or fails later as a traceback); the usage block printed above the error
    with pytest.raises(SystemExit) as stop:
        config.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err, err
    assert err.count("\n") == 1 and err.startswith(Path(sys.argv[0]).name) is not None


def test_every_flag_has_its_help_written_out():
    # planted bug: a flag added without help (or help generated from elsewhere): --help says nothing of it
    flags, _ = config.dataclass_flags(config.RunConfig)
    own = {k: f for spec in config.METHODS.values() for k, f in spec.flags.items()}
    assert all(len(f.help) > 15 for f in (flags | own).values())
    assert all(f.problem(f.default) is None for f in flags.values())  # every default inside its own range


def test_the_real_command_line_refuses_in_one_line_and_fast(tmp_path):
    # planted bug: the checks made after the model loads (a bad flag then costs a base build or 14 GB of
    # weights before the message); a DataError shown as a traceback
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "train_stream.py", "--epochs", "-1", "--cache-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert not list(tmp_path.iterdir())  # nothing was built
    bad = tmp_path / "bench"
    (bad / "reasoning_train").mkdir(parents=True)
    (bad / "reasoning_test").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "train_stream.py",
            "--stream",
            "ctbench",
            "--data-root",
            str(bad),
            "--order",
            "numglue",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--tiny-pretrain-steps",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "error:" in done.stderr and "numglue.json: file not found" in done.stderr


def test_resume_may_change_only_what_changes_speed_or_memory(tmp_path, capsys):
    # planted bugs: a resumed run that refuses a smaller evaluation batch after an out-of-memory (the old
    # way), or one that accepts a new learning rate (the run would no longer be one run)
    import dataclasses
    import json

    cfg, _ = config.parse_args(["--out", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    again, resume = config.parse_args(
        ["--resume", str(tmp_path / "run"), "--eval-batch-size", "4", "--micro-batch-size", "2"]
    )
    assert resume and (again.eval_batch_size, again.micro_batch_size, again.lr) == (4, 2, cfg.lr)
    with pytest.raises(SystemExit) as stop:
        config.parse_args(["--resume", str(tmp_path / "run"), "--lr", "1e-3"])
    assert stop.value.code == 2 and "drop --lr" in capsys.readouterr().err


def test_shard_runs_under_torchrun_even_as_one_process(monkeypatch, tmp_path):
    # planted bug: --shard refused by the process count (WORLD_SIZE 1) instead of by the launcher, so
    # `torchrun --nproc_per_node=1 ... --shard`, a legitimate first test of the sharded path, stops
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg, _ = config.parse_args(["--method", "seqlora", "--shard", "--out", str(tmp_path / "run")])
    assert cfg.shard
