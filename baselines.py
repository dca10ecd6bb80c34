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
    EWC, MAS    + (lambda/2) sum F (theta - theta*)^2 over the adapters, F from each task's data
    LwF         + KL to the previous adapters' answers on the new task's inputs
    OLoRA       one slice of the LoRA's ranks per task, the others frozen, slices kept orthogonal

METHODS maps each command-line name to its layer switches (pasmoe.PASsConfig) and its class.
This file imports pasmoe only; nothing here knows about LLaVA or files on disk. A method that
needs forward passes of its own (EWC, MAS, LwF) gets them from the loop's `forward`.
Hyperparameter defaults and where they come from: DESIGN.md, section 7.
"""

from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pasmoe import pas_layers, stabilization_loss


class Method:
    """Sequential fine-tuning: each task trains on its own data, nothing else is added.

    cfg: the run's settings (train_stream.RunConfig; read for the method's own flags)
    model: the model holding the PASs layers (not the DDP wrapper)
    stream: the tasks in training order (data.Task: key, train, test)
    forward: examples -> (logits, labels) of the model on them, labels -100 outside answers
    """

    def __init__(self, cfg, model, stream, forward=None):
        self.cfg, self.model, self.stream, self.forward = cfg, model, stream, forward

    def begin_task(self, t: int) -> None:
        pass

    def examples(self, t: int) -> list | None:
        return self.stream[t].train

    def extra_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Terms added to the task loss, by name (each is logged). batch holds the collated
        batch (`input_ids`, `attention_mask`, `labels`, `images`), the `inputs_embeds` and
        `logits` of this step, and `n_tokens` and `world`: the global count of answer tokens
        and the number of processes (task_loss's normalization)."""
        return {}

    def end_task(self, t: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs beyond the adapters (saved after every task)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
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

    def examples(self, t):
        if t < len(self.stream) - 1:
            return None
        return [ex for task in self.stream for ex in task.train]


# ---- the regularization family: EWC, MAS, LwF ----


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained parameters (the adapters), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(answer tokens, vocab): the logits at the positions that predict an answer token."""
    return logits[:, :-1][labels[:, 1:] != -100]


def _grads(scalar: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """d scalar / d each parameter, zeros for parameters it does not depend on."""
    grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if dist.is_available() and dist.is_initialized():
        for x in tensors:
            dist.all_reduce(x)


class _Consolidation(Method):
    """(lambda/2) sum_i F_i (theta_i - theta*_i)^2 over the adapter parameters, with theta*
    the parameters that ended the last task and F accumulated over tasks as online EWC does:
    F <- gamma F + F_t (gamma = 1, the default: a plain sum over tasks). Subclasses define
    F_t through `per_example`: one example's contribution, to be squared or made absolute."""

    strength = "ewc_lambda"  # the flag that holds lambda

    def __init__(self, cfg, model, stream, forward=None):
        super().__init__(cfg, model, stream, forward)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def per_example(self, params: dict, example) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def task_importance(self, examples: list) -> dict[str, torch.Tensor]:
        """F_t: the mean over `examples` of per_example, one example at a time (each process
        takes its share under DDP; the sums are all-reduced)."""
        params = adapter_params(self.model)
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        was_training = self.model.training
        self.model.eval()  # no dropout: the importance of the parameters that ended the task
        for ex in examples[rank::world]:
            for n, g in self.per_example(params, ex).items():
                total[n] += g.float()
        self.model.train(was_training)
        _all_reduce(list(total.values()))
        return {n: v / len(examples) for n, v in total.items()}

    def end_task(self, t):
        new = self.task_importance(self.stream[t].train)
        gamma = self.cfg.ewc_gamma
        self.importance = {n: gamma * self.importance[n] + v if n in self.importance else v for n, v in new.items()}
        self.anchor = {n: p.detach().float().clone() for n, p in adapter_params(self.model).items()}

    def extra_loss(self, batch):
        lam = getattr(self.cfg, self.strength)
        if not self.anchor:  # before the first task ends
            return {"consolidation": torch.zeros((), device=batch["logits"].device)}
        total = sum((self.importance[n] * (p.float() - self.anchor[n]).square()).sum()
                    for n, p in adapter_params(self.model).items())
        return {"consolidation": lam / 2 * total}

    def state_dict(self):
        return {f"importance.{n}": v for n, v in self.importance.items()} | {f"anchor.{n}": v for n, v in self.anchor.items()}

    def load_state_dict(self, state):
        self.importance = {k.removeprefix("importance."): v for k, v in state.items() if k.startswith("importance.")}
        self.anchor = {k.removeprefix("anchor."): v for k, v in state.items() if k.startswith("anchor.")}


class EWC(_Consolidation):
    """Elastic weight consolidation (Kirkpatrick et al., PNAS 2017), on the adapters.

    F_t is the diagonal empirical Fisher: the mean over the task's training items of the
    squared gradient of that item's task loss (its mean next-token cross entropy over its
    answer tokens). Online EWC's decay gamma (Schwarz et al. 2018) is --ewc-gamma.
    """

    def per_example(self, params, example):
        logits, labels = self.forward([example])
        keep = labels[:, 1:] != -100
        loss = F.cross_entropy(answer_logits(logits, labels).float(), labels[:, 1:][keep])
        return {n: g.square() for n, g in _grads(loss, params).items()}


class MAS(_Consolidation):
    """Memory aware synapses (Aljundi et al., ECCV 2018), on the adapters.

    F_t is the mean over the task's training items of |d ||f(x)||^2 / d theta|, with f(x) the
    logits at the item's answer positions (the positions are read from the labels; their
    values are not used: MAS needs no labels). Accumulated and applied as in EWC.
    """

    strength = "mas_lambda"

    def per_example(self, params, example):
        logits, labels = self.forward([example])
        energy = answer_logits(logits, labels).float().square().sum()
        return {n: g.abs() for n, g in _grads(energy, params).items()}


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(softmax(teacher / T) || softmax(student / T)); rows are answer tokens."""
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


class LwF(Method):
    """Learning without forgetting (Li and Hoiem, ECCV 2016 / TPAMI 2017), on the adapters.

    Before task t (t > 0), the adapters are copied: they are the teacher. Each step adds
    lambda * mean over answer tokens of KL(p_teacher || p_model), both softmaxes at
    temperature T, on the new task's own inputs. The teacher runs with the copied adapter
    values substituted into the same model (torch.func.functional_call): no second model.
    """

    def begin_task(self, t):
        self.teacher = {n: p.detach().clone() for n, p in adapter_params(self.model).items()} if t > 0 else None

    def extra_loss(self, batch):
        logits, labels = batch["logits"], batch["labels"]
        if self.teacher is None:
            return {"distill": torch.zeros((), device=logits.device)}
        inputs = {"inputs_embeds": batch["inputs_embeds"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            old = torch.func.functional_call(self.model, self.teacher, args=(), kwargs=inputs, strict=False).logits
        kl = distillation_kl(answer_logits(logits, labels), answer_logits(old, labels), self.cfg.lwf_temperature)
        return {"distill": self.cfg.lwf_lambda * kl * batch["world"] / batch["n_tokens"]}


# ---- the architecture family: O-LoRA ----


class OLoRA(Method):
    """O-LoRA (Wang et al., Findings of EMNLP 2023): one LoRA per task in orthogonal subspaces.

    The run's single LoRA of rank R = E * r is cut into T slices of k = R // T ranks (the
    R - T k left-over ranks keep B = 0 and never train): the same adapter size as the other
    methods. Task t trains only slice t (rows t k .. t k + k of A, the same columns of B);
    the gradients of every other slice are zeroed, so old slices stay as they ended. The
    model always uses the sum of all slices. Added to the loss:
        lambda_1 * sum over layers and old slices s of ||A_t A_s^T||_1   (entries' |.| summed)
      + lambda_2 * (||A_t||^2 + ||B_t||^2)
    """

    def __init__(self, cfg, model, stream, forward=None):
        super().__init__(cfg, model, stream, forward)
        if cfg.weight_decay:
            raise ValueError("olora needs --weight-decay 0: AdamW's decay would shrink the frozen slices of old tasks")
        self.layers = list(pas_layers(model).values())
        rank = self.layers[0].lora_A.shape[1]
        if any(layer.lora_A.shape[0] != 1 for layer in self.layers):
            raise ValueError("olora slices one plain LoRA: the layers need gate='single' (num_experts=1)")
        self.k = rank // len(stream)
        if self.k == 0:
            raise ValueError(f"olora: a LoRA of rank {rank} cannot give each of {len(stream)} tasks a slice; raise --rank")
        self.hooks = []

    def slice(self, t: int) -> slice:
        return slice(t * self.k, (t + 1) * self.k)

    def begin_task(self, t):
        self.t = t
        mask = torch.zeros(self.layers[0].lora_A.shape[1])
        mask[self.slice(t)] = 1
        for layer in self.layers:
            m = mask.to(layer.lora_A.device)
            self.hooks.append(layer.lora_A.register_hook(lambda g, m=m: g * m[:, None]))  # rows of A: (1, R, d)
            self.hooks.append(layer.lora_B.register_hook(lambda g, m=m: g * m))  # columns of B: (1, o, R)

    def extra_loss(self, batch):
        now = self.slice(self.t)
        ortho = norm = torch.zeros((), device=batch["logits"].device)
        for layer in self.layers:
            A_new = layer.lora_A[0, now].float()
            if self.t > 0:
                ortho = ortho + (A_new @ layer.lora_A[0, : now.start].float().T).abs().sum()
            norm = norm + A_new.square().sum() + layer.lora_B[0, :, now].float().square().sum()
        return {"orthogonal": self.cfg.olora_lambda1 * ortho, "l2": self.cfg.olora_lambda2 * norm}

    def end_task(self, t):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


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
    "ewc": (dict(gate="single", reg="none"), EWC),
    "mas": (dict(gate="single", reg="none"), MAS),
    "lwf": (dict(gate="single", reg="none"), LwF),
    "olora": (dict(gate="single", reg="none"), OLoRA),
}
