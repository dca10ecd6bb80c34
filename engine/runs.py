"""A run directory, and what a run's numbers depend on."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engine.processes import rank_world


def atomic_write(path: Path, content: str | Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: into a temporary name beside it (the same filesystem), then
    rename. content: the text, or a function that writes what it is given (safetensors, a folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        content(tmp)
    os.replace(tmp, path)


def git_commit() -> str:
    here = Path(__file__).parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        return sha.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What the numbers depend on besides the settings. Per-seed values differ across CPUs (another
    order of floating-point sums, another kernel), so the CPU and its vector capability are recorded."""
    import transformers

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "commit": git_commit(),
        "device_name": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


class RunDirError(ValueError):
    """A run directory that cannot be used as asked: says which and why."""


class RunDir:
    """A run directory: config.json (every setting and what the numbers depend on), log.jsonl (one line
    per training step), state.json (tasks done, the accuracy matrix so far, timings), ckpt/ (what trains,
    after every task), predictions/ and gates/. Only the main process writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.log_file = None

    def create(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        for sub in ("ckpt", "predictions", "gates"):
            (self.path / sub).mkdir()
        atomic_write(self.path / "config.json", json.dumps(config, indent=1))

    def open(self, fresh: dict | None, tasks: int, changed: dict) -> dict:
        """The run's state. A new run's rank 0 creates the directory with its config (`fresh`); a resumed run
        keeps its config, but for `changed` (what may change on a resume: config.RESUME_MAY_CHANGE, given
        again). Every rank then checks that it sees the directory: the ranks of a multi-node run need it on
        one shared filesystem."""
        rank, world = rank_world()
        if rank == 0 and fresh is not None:
            self.create(fresh)
        elif rank == 0 and self.config() | changed != self.config():
            self.write_json("config.json", self.config() | changed)
        if world > 1:
            dist.barrier()
        if not (self.path / "config.json").is_file():
            raise RunDirError(
                f"rank {rank} cannot see {self.path}/config.json: every node of a multi-node run needs "
                "the run directory on one shared filesystem"
            )
        return self.state(tasks)

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def state(self, tasks: int) -> dict:
        """The saved state, or a fresh one for a stream of `tasks` tasks."""
        if (self.path / "state.json").exists():
            return json.loads((self.path / "state.json").read_text())
        return {
            "completed": 0,
            "evaluated": 0,
            "R": [[None] * tasks for _ in range(tasks)],
            "trained": [],
            "train_s": [],
            "eval_s": [],
        }

    def save_state(self, state: dict) -> None:
        atomic_write(self.path / "state.json", json.dumps(state, indent=1))
        if self.log_file is not None:
            self.log_file.flush()

    def open_log(self, finished_tasks: list[str]) -> None:
        """Keep the log lines of finished tasks only (an interrupted task is trained again), then append."""
        log = self.path / "log.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        atomic_write(log, "".join(line + "\n" for line in lines if logged_task(line) in finished_tasks))
        self.log_file = open(log, "a")

    def log(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")

    def write_json(self, name: str, value) -> None:
        atomic_write(self.path / name, json.dumps(value, indent=1))


def logged_task(line: str) -> str | None:
    """The task of a log line; None for a line that a hard kill cut short (its task is dropped anyway)."""
    try:
        return json.loads(line)["task"]
    except json.JSONDecodeError:
        return None
