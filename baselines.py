"""Continual-learning methods behind one small seam, and the reference methods around PASs-MoE.

The loop in train_stream.py is the same for every method. A method is an object that it
calls at four points; the default hooks are plain sequential fine-tuning:

    for t, task in enumerate(stream):
        method.begin_task(t)                          before task t trains
        examples = method.examples(t)                 what task t trains on (None: skip step t)
        for each batch of examples:
            loss = task loss + sum(method.extra_loss(batch).values())
        PASs statistics (Eq. 9-10) and anchors        pasmoe.track_importance, pasmoe.end_task
        method.end_task(t)                            after task t

    Method      sequential fine-tuning           seqlora, moelora-topk, moelora, pas-rw
    Stabilized  + Eq. 11 of the PASs layers      pasmoe (importance weights), pasmoe-random
                                                 (permuted), l2 (w = 1: plain L2 to the anchor)
    Replay      + a buffer of finished tasks' training items, mixed into each later task
    Joint       every task's training data at once, evaluated at the end (the upper bound)

METHODS maps each command-line name to its layer switches (pasmoe.PASsConfig) and its class.
This file imports pasmoe only; nothing here knows about LLaVA or files on disk.
"""

from __future__ import annotations

import math
import random

import torch

from pasmoe import stabilization_loss


class Method:
    """Sequential fine-tuning: each task trains on its own data, nothing else is added.

    cfg: the run's settings (train_stream.RunConfig; read for the method's own flags)
    model: the model holding the PASs layers (not the DDP wrapper)
    stream: the tasks in training order (data.Task: key, train, test)
    """

    trains_every_task = True  # False: the matrix has only its last row (Joint)

    def __init__(self, cfg, model, stream):
        self.cfg, self.model, self.stream = cfg, model, stream

    def begin_task(self, t: int) -> None:
        pass

    def examples(self, t: int) -> list | None:
        return self.stream[t].train

    def extra_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Terms added to the task loss, by name (each is logged). batch holds the model's
        inputs, `labels` and the model's `logits` for this step."""
        return {}

    def end_task(self, t: int) -> None:
        pass


class Stabilized(Method):
    """Eq. 11: lambda_A sum w ||a - a*||^2 + lambda_B sum w ||b - b*||^2 over the PASs layers,
    with the layers' weights w (reg = "pas", "random" or "uniform")."""

    def extra_loss(self, batch):
        return {"stab": stabilization_loss(self.model).total}


class Replay(Method):
    """Experience replay (the Replay row of the paper's Table 1).

    After task s, a fixed fraction of its training items (cfg.replay_fraction, at least one)
    joins the buffer; every later task trains on its own items plus the whole buffer,
    shuffled together. The buffer never holds test items. Which items are kept depends only
    on (seed, s), so a resumed run rebuilds the same buffer.
    """

    def buffer(self, t: int) -> list:
        """The replayed items while task t trains: a sample of each task before t."""
        kept = []
        for s in range(t):
            train = self.stream[s].train
            n = max(1, math.ceil(self.cfg.replay_fraction * len(train)))
            kept += random.Random(f"replay-{self.cfg.seed}-{s}").sample(train, n)
        return kept

    def examples(self, t):
        return self.stream[t].train + self.buffer(t)


class Joint(Method):
    """Multitask training on the union of all tasks' training data (the upper bound).

    Nothing trains until the last step, which trains on everything for the same number of
    epochs as each task of the stream: every example is seen as often as sequentially.
    Only the last row of the accuracy matrix exists, so AP is defined and BWT is not.
    """

    trains_every_task = False

    def examples(self, t):
        if t < len(self.stream) - 1:
            return None
        return [ex for task in self.stream for ex in task.train]


METHODS = {  # name -> (PASs layer switches, method); paper Tables 1, 2 and 7
    "seqlora": (dict(gate="single", reg="none"), Method),  # one plain LoRA of the same total rank
    "moelora-topk": (dict(gate="topk", reg="none"), Method),
    "moelora": (dict(gate="softmax", reg="none"), Method),
    "pas-rw": (dict(gate="pas", reg="none"), Method),
    "pasmoe": (dict(gate="pas", reg="pas"), Stabilized),  # the paper's method
    "pasmoe-random": (dict(gate="pas", reg="random"), Stabilized),
    "l2": (dict(gate="pas", reg="uniform"), Stabilized),
    "replay": (dict(gate="single", reg="none"), Replay),
    "joint": (dict(gate="single", reg="none"), Joint),
}
