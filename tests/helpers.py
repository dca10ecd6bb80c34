"""Helpers shared by the tests: the flags of a small run, those flags cut to what a method reads, and a
two-process torchrun of train_stream.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def only_read(argv: list[str]) -> list[str]:
    """A list of test flags, shared by many methods, without the flags that its --method does not read
    (train_stream refuses those)."""
    import config

    given = {k: argv[argv.index(f"--{k}") + 1] for k in ("method", "stream", "model") if f"--{k}" in argv}
    unread = {k for k, (read, _) in config.read_by(config.RunConfig(**given)).items() if not read}
    groups, i = [], 0  # a flag with its value, or a switch alone
    while i < len(argv):
        takes = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        groups.append(argv[i : i + 1 + takes])
        i += 1 + takes
    return [a for group in groups if group[0][2:].replace("-", "_") not in unread for a in group]


# A two-task stream that runs in seconds: 16 training and 4 test items per task, short answers, a base
# pretrained for 3 steps, 3 experts of rank 2. The training settings are the caller's (LESSON's commands
# keep their own); SMALL adds a batch and a learning rate at which 16 items visibly train.
REDUCED = ["--order", "numglue,art", "--n-train", "16", "--n-test", "4", "--epochs", "1", "--max-new-tokens", "8"]
REDUCED += ["--eval-batch-size", "8", "--probe-size", "2", "--tiny-pretrain-steps", "3", "--num-experts", "3"]
REDUCED += ["--rank", "2"]
SMALL = REDUCED + ["--batch-size", "8", "--lr", "5e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """train_stream.py under torchrun, 2 gloo processes of one thread each; its stderr's head (the failing
    rank's cause) and tail on failure."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    done = subprocess.run(
        cmd + [str(ROOT / "train_stream.py"), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[:2000] + "\n...\n" + done.stderr[-3000:]
    return done


class ExpertLayers(torch.nn.Module):
    """Two "decoder layers" of one PASs Linear each, named as a transformer's (layers.N.proj), on a
    vocabulary of 7 and a width of 5, with one expert per task (baselines.ChosenExperts, as train_stream
    gives HiDe and DDAS): the experts of the first `trained` tasks have B != 0 (all when None), the
    others are as reset (random A, B = 0)."""

    def __init__(self, experts: int = 2, trained: int | None = None):
        from baselines import ChosenExperts
        from pasmoe import PASsConfig, inject

        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 5)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(5, 5)}) for _ in range(2))
        cfg = PASsConfig(num_experts=experts, rank=2, stabilize=False)
        inject(self, cfg, target=r"proj$", layer_class=ChosenExperts)
        with torch.no_grad():
            for layer in (self.layers[0]["proj"], self.layers[1]["proj"]):
                layer.lora_B[:trained].normal_()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, x):
        for layer in self.layers:
            x = layer["proj"](x)
        return x
