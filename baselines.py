"""Continual-learning methods behind one small seam, and the reference methods around PASs-MoE.

The loop in train_stream.py is the same for every method. A method is an object that it
calls at these points; the default hooks are plain sequential fine-tuning:

    for t, task in enumerate(stream):
        method.begin_task(t)                          before task t trains
        examples = method.examples(t)                 what task t trains on (None: skip step t)
        for each batch of examples:
            embeds, mask = method.inputs(...)         the model's input (L2P prepends prompts)
            loss = task loss + sum(method.extra_loss(batch).values())
        PASs statistics (Eq. 9-10) and anchors        pasmoe.track_importance, pasmoe.end_task
        method.end_task(t)                            after task t
        with method.evaluating(examples):             around generation and probes (HiDe-LLaVA
            ...                                       and DDAS pick each input's expert here)

    Method      sequential fine-tuning           seqlora, moelora-topk, moelora, pas-rw
    Stabilized  + Eq. 11 of the PASs layers      pasmoe (importance weights), pasmoe-random
                                                 (permuted), l2 (w = 1: plain L2 to the anchor)
    Replay      + a buffer of finished tasks' training items, mixed into each later task
    Joint       every task's training data at once, evaluated at the end (the upper bound)
    EWC, MAS    + (lambda/2) sum F (theta - theta*)^2 over the adapters, F from each task's data
    LwF         + KL to the previous adapters' answers on the new task's inputs
    OLoRA       one slice of the LoRA's ranks per task, the others frozen, slices kept orthogonal
    SeqFT       no adapters: the language model and the projector train task after task
    L2P         no adapters: a pool of prompts picked per input by key, prepended to its input
    HiDe        one expert per task; at inference, experts mixed by similarity to task anchors
    DDAS        one expert per task; at inference, each input's expert picked by autoencoders

The PASs layer's variants for the ablations live here too, as small subclasses: a learned
router (MoELoRA), experts chosen from outside (HiDe-LLaVA, DDAS), and Eq. 11 with permuted or
uniform weights. METHODS maps each command-line name to a Spec: its class, its adapters and
its own flags. Nothing here reads files; what it knows of LLaVA is the module names seqft
unfreezes, the "layers.N." of decoder layers (HiDe's top layer) and the input embeddings (L2P).
A method that needs passes of its own gets them from the loop: `forward` (EWC, MAS) and
`features` (L2P, HiDe-LLaVA, DDAS). How each method differs from its paper, its original code
and the benchmark's code: DESIGN.md, section 7, numbered; the code cites them ("DESIGN.md 7, ewc 3").
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.flags import Flag
from engine.processes import gather, local, rank_world
from engine.steps import optimizer_step
from pasmoe import pas_layers
from pasmoe_fused import FusedPASsMoELinear, stabilization_loss

# ---- the PASs layer's variants ----


class RoutedMoELinear(FusedPASsMoELinear):
    """MoELoRA (the paper's Table 2 rows): the same experts, mixed by a learned router, softmax(W_g h / tau)
    over every expert, or (top_k) over the k largest logits only, 0 elsewhere. W_g: (e, d), no bias."""

    def __init__(self, base: nn.Linear, cfg, index: int = 0, top_k: int | None = None):
        super().__init__(base, cfg, index)
        self.top_k = top_k
        self.router = nn.Linear(
            base.in_features, cfg.num_experts, bias=False, device=self.lora_A.device, dtype=self.lora_A.dtype
        )

    def gate(self, x, z=None):
        logits = F.linear(x, self.router.weight.to(x.dtype)).float()  # (..., e)
        if self.top_k is not None:
            kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(
                -1, logits.topk(self.top_k, dim=-1).indices, True
            )
            logits = logits.masked_fill(~kept, -math.inf)
        return torch.softmax(logits / self.cfg.temperature, dim=-1)


class ChosenExperts(FusedPASsMoELinear):
    """The mixture set from outside: `chosen` is pi, (e,) or (b, 1, e), broadcast over the tokens
    (HiDe-LLaVA and DDAS train one expert per task and pick the experts of each input)."""

    chosen: torch.Tensor | None = None

    def gate(self, x, z=None):
        return torch.broadcast_to(self.chosen.to(x.device, torch.float32), (*x.shape[:-1], self.cfg.num_experts))


class PermutedWeights(FusedPASsMoELinear):
    """Eq. 11 with the importance weights permuted over (expert, rank) within the layer (the paper's
    Table 7, random regularization): the same total strength on directions chosen by chance. The
    permutation is a function of (seed, layer index), so it needs no saving."""

    def __init__(self, base: nn.Linear, cfg, index: int = 0, seed: int = 0):
        super().__init__(base, cfg, index)
        self.seed = seed

    def stab_weights(self):
        w = super().stab_weights()
        perm = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.index))
        return w.flatten()[perm.to(w.device)].view_as(w)


class UniformWeights(FusedPASsMoELinear):
    """Eq. 11 with w = 1 once a task has ended: plain L2 to the anchors, no importance (`l2`)."""

    def stab_weights(self):
        return (
            torch.ones_like(self.importance_agg) if self.importance_agg.any() else torch.zeros_like(self.importance_agg)
        )


class Method:
    """Sequential fine-tuning: each task trains on its own data, nothing else is added.

    cfg: the run's settings (config.RunConfig); cfg.method_args holds the method's own flags
    model: the model holding the PASs layers (not the DDP wrapper)
    stream: the tasks in training order (data.Task: key, train, test)
    forward: examples -> (logits, labels) of the model on them, labels -100 outside answers
    features: examples -> each one's frozen features {"image": (d_vision,) or None, "text": (d,)}:
        the mean vision feature of its image and the mean token embedding of its instruction
    """

    def __init__(self, cfg, model, stream, forward=None, features=None):
        self.cfg, self.model, self.stream, self.forward, self.features = cfg, model, stream, forward, features
        self.args = SimpleNamespace(**getattr(cfg, "method_args", {}))  # the method's own flags (Spec.flags)

    @staticmethod
    def setup_model(model) -> None:
        """What the method changes in the model before it trains (which parts train, in which dtype); also
        run on the model built on the meta device, for the memory plan."""

    def sharded(self) -> None:
        """Called once the model is sharded (FSDP2, --shard): state the method keeps beside the parameters
        must be sharded alike."""

    def begin_task(self, t: int) -> None:
        pass

    def examples(self, t: int) -> list | None:
        return self.stream[t].train

    def inputs(self, batch: dict, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The language model's input for a batch: embeddings (b, n, d) and attention mask (b, n),
        in training, importance, probes and generation alike. A method may prepend to both."""
        return embeds, mask

    def extra_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Terms added to the task loss, by name (each is logged), for one micro-batch. batch holds the
        collated micro-batch (`input_ids`, `attention_mask`, `labels`, `examples`), its `inputs_embeds` and
        `logits`, `n_tokens` and `world` (the step's global count of answer tokens and the number of
        processes: task_loss's normalization), `items`, the step's global count of items, and `share`, this
        micro-batch's share of the process's part of the step (0: a stand-in that must add nothing). A term
        over answer tokens is divided by n_tokens and multiplied by world, as the task loss, and one over items
        by items (times world); any other term (a penalty on the parameters) is multiplied by share, so that
        the micro-batches of a step add up to it once."""
        return {}

    def evaluating(self, examples: list):
        """A context around generation and probes on these examples; methods that pick experts
        for each input set them here."""
        return contextlib.nullcontext()

    def task_id_accuracy(self) -> dict[str, float] | None:
        """For methods that identify each input's task: the % identified right on each task's
        test items in the final evaluation."""
        return None

    def end_task(self, t: int) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs beyond the adapters (saved after every task)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class Stabilized(Method):
    """Eq. 11: lambda_A sum w ||a - a*||^2 + lambda_B sum w ||b - b*||^2 over the PASs layers, with
    each layer's weights w (importance; PermutedWeights, UniformWeights for the ablations)."""

    def extra_loss(self, batch):
        return {"stab": batch["share"] * stabilization_loss(self.model)}


class Replay(Method):
    """Experience replay (the Replay row of the paper's Table 1).

    After task s, a fixed fraction of its training items (--replay-fraction, at least one)
    joins the buffer; every later task trains on its own items plus the whole buffer,
    shuffled together. The buffer never holds test items. Which items are kept depends only
    on (seed, s), so a resumed run rebuilds the same buffer.
    """

    def buffer(self, t: int) -> list:
        """The replayed items while task t trains: a sample of each task before t."""
        kept = []
        for s in range(t):
            train = self.stream[s].train
            n = max(1, math.ceil(self.args.replay_fraction * len(train)))  # DESIGN.md 7, replay 1
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


def _grads(scalar: torch.Tensor, params: dict, sharded: bool) -> dict[str, torch.Tensor]:
    """d scalar / d each parameter, zeros for parameters it does not depend on. Sharded (FSDP2): through
    backward, which leaves each rank its shard of the gradient averaged over the ranks (autograd.grad cannot
    reach the sharded parameters: a forward computes with gathered copies)."""
    if not sharded:
        grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
    scalar.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    if rank_world()[1] > 1:
        for x in tensors:
            dist.all_reduce(x)


class _Consolidation(Method):
    """(lambda/2) sum_i F_i (theta_i - theta*_i)^2 over the adapter parameters, with theta*
    the parameters that ended the last task and F accumulated over tasks as online EWC does:
    F <- gamma F + F_t (gamma = 1, the default: a plain sum over tasks). Subclasses define
    F_t through `per_example`: one example's contribution, to be squared or made absolute."""

    strength, decay = "ewc_lambda", "ewc_gamma"  # the flags that hold lambda and gamma

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.shard = getattr(cfg, "shard", False)

    def per_example(self, params: dict, example) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sharded(self):
        """F and the anchors shaped as the sharded parameters (a resumed run loads them whole)."""
        from torch.distributed.tensor import distribute_tensor

        params = adapter_params(self.model)  # all in the sharded decoder layers (--shard trains no projector)
        self.importance = {
            n: distribute_tensor(v, params[n].device_mesh, params[n].placements) for n, v in self.importance.items()
        }
        self.anchor = {
            n: distribute_tensor(v, params[n].device_mesh, params[n].placements) for n, v in self.anchor.items()
        }

    def task_importance(self, examples: list) -> dict[str, torch.Tensor]:
        """F_t: the mean over `examples` of per_example, one example at a time. Under DDP each process takes
        its share and the sums are all-reduced; under FSDP2 (--shard) every process takes every example, in
        step, and keeps its shard of each sum (the pass then takes as long as on one GPU: DESIGN.md 7, ewc 3)."""
        params = adapter_params(self.model)
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        rank, world = (0, 1) if self.shard else rank_world()
        was_training = self.model.training
        self.model.eval()  # no dropout: the importance of the parameters that ended the task
        for ex in examples[rank::world]:
            for n, g in self.per_example(params, ex).items():
                total[n] += g.float()
        self.model.train(was_training)
        if not self.shard:
            _all_reduce(list(total.values()))
        return {n: v / len(examples) for n, v in total.items()}

    def end_task(self, t):
        new = self.task_importance(self.stream[t].train)
        gamma = getattr(self.args, self.decay)
        self.importance = {n: gamma * self.importance[n] + v if n in self.importance else v for n, v in new.items()}
        self.anchor = {n: p.detach().float().clone() for n, p in adapter_params(self.model).items()}

    def extra_loss(self, batch):
        lam = getattr(self.args, self.strength)
        if not self.anchor:  # before the first task ends
            return {"consolidation": torch.zeros((), device=batch["logits"].device)}
        total = sum(  # local: under FSDP2 each rank's shard (its gradient is that shard's; the sum is logged)
            (local(self.importance[n]) * (local(p).float() - local(self.anchor[n])).square()).sum()
            for n, p in adapter_params(self.model).items()
        )
        return {"consolidation": batch["share"] * lam / 2 * total}

    def state_dict(self):
        return {f"importance.{n}": v for n, v in self.importance.items()} | {
            f"anchor.{n}": v for n, v in self.anchor.items()
        }

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
        return {n: g.square() for n, g in _grads(loss, params, self.shard).items()}


class MAS(_Consolidation):
    """Memory aware synapses (Aljundi et al., ECCV 2018), on the adapters.

    F_t is the mean over the task's training items of |d ||f(x)||^2 / d theta|, with f(x) the
    logits at the item's answer positions (the positions are read from the labels; their
    values are not used: MAS needs no labels). Accumulated and applied as in EWC.
    """

    strength, decay = "mas_lambda", "mas_gamma"

    def per_example(self, params, example):
        logits, labels = self.forward([example])
        energy = answer_logits(logits, labels).float().square().sum()
        return {n: g.abs() for n, g in _grads(energy, params, self.shard).items()}


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

    def extra_loss(self, batch):  # DESIGN.md 7, lwf 2: the teacher runs in the model's mode (dropout 0: train = eval)
        logits, labels = batch["logits"], batch["labels"]
        if self.teacher is None:
            return {"distill": torch.zeros((), device=logits.device)}
        inputs = {"inputs_embeds": batch["inputs_embeds"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            old = torch.func.functional_call(self.model, self.teacher, args=(), kwargs=inputs, strict=False).logits[
                :, -labels.shape[1] :
            ]
        kl = distillation_kl(answer_logits(logits, labels), answer_logits(old, labels), self.args.lwf_temperature)
        return {"distill": self.args.lwf_lambda * kl * batch["world"] / batch["n_tokens"]}  # DESIGN.md 7, lwf 3


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

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        if cfg.weight_decay:
            raise ValueError("olora needs --weight-decay 0: AdamW's decay would shrink the frozen slices of old tasks")
        self.layers = list(pas_layers(model).values())
        rank = self.layers[0].lora_A.shape[1]
        if any(layer.lora_A.shape[0] != 1 for layer in self.layers):
            raise ValueError("olora slices one plain LoRA: the layers need num_experts=1")
        self.k = rank // len(stream)
        if self.k == 0:
            raise ValueError(
                f"olora: a LoRA of rank {rank} cannot give each of {len(stream)} tasks a slice; raise --rank"
            )
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
                ortho = ortho + (A_new @ layer.lora_A[0, : now.start].float().T).abs().sum()  # DESIGN.md 7, olora 2
            norm = norm + A_new.square().sum() + layer.lora_B[0, :, now].float().square().sum()
        share = batch["share"]
        return {"orthogonal": share * self.args.olora_lambda1 * ortho, "l2": share * self.args.olora_lambda2 * norm}

    def end_task(self, t):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


# ---- without adapters: SeqFT, L2P ----


class SeqFT(Method):
    """Sequential full fine-tuning (the SeqFT row of the paper's Table 1; the benchmark's
    train_cl.py with --cl none): the language model, its head and the projector train, task after
    task; the vision tower stays frozen, as LLaVA keeps it; there are no adapters. The trained
    parts are kept in fp32 (master weights; autocast feeds the GEMMs bf16 under --dtype bfloat16),
    and every checkpoint holds them all."""

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        self.setup_model(model)

    @staticmethod
    def setup_model(model):
        """What seqft trains, unfrozen and in fp32 (also on the meta device, for the memory plan)."""
        for name, module in model.named_modules():
            if name in ("model.language_model", "lm_head", "model.multi_modal_projector"):
                module.float().requires_grad_(True)  # DESIGN.md 7, seqft 1


class PromptPool(nn.Module):
    """L2P's pool: M prompts of L tokens in the language model's input space, each with one key per
    kind of query (image queries and text queries have different widths; one pool serves both)."""

    def __init__(self, size: int, length: int, width: int, query_widths: dict, scale: float, generator):
        super().__init__()
        uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731 (U(-1, 1), l2p-pytorch)
        self.prompts = nn.Parameter(uniform(size, length, width) * scale)
        self.keys = nn.ParameterDict({kind: nn.Parameter(uniform(size, w)) for kind, w in query_widths.items()})


class L2P(Method):
    """Learning to prompt (Wang et al., CVPR 2022; google-research/l2p, l2p-pytorch): a pool of
    prompts with keys; each input's query, a frozen feature computed without gradients, picks the
    N prompts whose keys are nearest (cosine), and they are prepended to the language model's
    input embeddings in training and in generation (prefill; every decode step attends to them).
    A pull term draws the chosen keys to the queries: - lambda * sum over the N of cos(q, k), mean
    over the step's items (all processes'). Only the pool trains; the model is frozen and has no adapters. Query: the
    mean vision feature of the image for image tasks, the mean input embedding of the instruction
    for text-only tasks (our adaptation). Selection per input (the original votes per batch)."""

    size, length, top_n, pull = 10, 5, 5, 0.1  # M, L_p, N, lambda: the L2P paper's setting (l2p-pytorch's config)

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        table = model.get_input_embeddings().weight
        first = {
            kind: next(
                (ex for task in stream for ex in task.train if (ex.image is not None) == (kind == "image")), None
            )
            for kind in ("image", "text")
        }
        widths = {kind: features([ex])[0][kind].numel() for kind, ex in first.items() if ex is not None}
        g = torch.Generator().manual_seed(cfg.seed)
        pool = PromptPool(self.size, self.length, table.shape[1], widths, table.detach().float().std().item(), g)
        model.add_module("l2p_pool", pool.to(table.device))  # a part of the model: DDP syncs it, checkpoints hold it
        self.pool, self._pull = pool, None

    def select(self, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (b, N) of each input's prompts, their cosine similarities (b, N) to its query)."""
        sims = []
        for f in self.features(examples):
            kind = "image" if f["image"] is not None else "text"  # DESIGN.md 7, l2p 1
            sims.append(
                F.cosine_similarity(self.pool.keys[kind], f[kind].to(self.pool.prompts.device).unsqueeze(0), dim=-1)
            )
        top = torch.stack(sims).topk(self.top_n, dim=-1)
        return top.indices, top.values

    def inputs(self, batch, embeds, mask):
        chosen, sims = self.select(batch["examples"])
        self._pull = sims.sum()  # over the micro-batch's items and their N prompts
        prefix = self.pool.prompts[chosen].flatten(1, 2).to(embeds.dtype)  # (b, N L, d)
        return torch.cat([prefix, embeds], dim=1), torch.cat(
            [torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1
        )

    def extra_loss(self, batch):
        unused = sum(
            key.sum() for key in self.pool.keys.values()
        )  # the other modality's keys too (times 0): DDP wants every parameter in the graph
        per_item = batch["world"] / batch["items"] if batch["share"] else 0.0  # DDP averages over the processes
        return {"pull": -self.pull * per_item * self._pull + 0.0 * unused}


# ---- one expert per task, picked at inference: HiDe-LLaVA, DDAS ----


class _TaskExperts(Method):
    """The PASs layers hold one expert per task (config.adapters gives them num_experts = T, the same
    total rank split over the tasks); task t trains expert t only, in every layer, with the gate
    set to it. Subclasses choose, for each test input, a mixture over the tasks seen so far."""

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        self.layers = pas_layers(model)
        self.seen, self.hits = 0, {}  # tasks trained so far; (task key, example id) -> identified right
        self.keys = [task.key for task in stream]

    def begin_task(self, t):
        for layer in self.layers.values():
            layer.chosen = F.one_hot(torch.tensor(t), len(self.stream)).float()

    def end_task(self, t):
        self.seen = t + 1

    def weights(self, feats: list) -> torch.Tensor:
        raise NotImplementedError

    def _modality_tasks(self, f: dict) -> list[int]:
        """The seen tasks of this input's kind (with or without an image): the candidates."""
        has_image = f["image"] is not None
        return [s for s in range(self.seen) if (self.stream[s].train[0].image is not None) == has_image]

    def _record(self, examples: list, w: torch.Tensor) -> None:
        for ex, row in zip(examples, w):
            self.hits[(ex.task, ex.id)] = bool(row.sum() > 0 and self.keys[int(row.argmax())] == ex.task)

    def task_id_accuracy(self):
        per_task = {}
        hits = {key: hit for part in gather(self.hits) for key, hit in part.items()}  # each rank saw its share
        for (task, _), hit in hits.items():
            per_task.setdefault(task, []).append(hit)
        return {task: 100 * sum(hits) / len(hits) for task, hits in per_task.items()} or None

    @contextlib.contextmanager
    def evaluating(self, examples):
        w = self.weights(self.features(examples))  # (b, T), rows sum to 1 (or 0: the frozen base)
        self._record(examples, w)
        with self.gates(w.unsqueeze(1)):  # (b, 1, T): one mixture per input, every token
            yield

    @contextlib.contextmanager
    def gates(self, w: torch.Tensor):
        saved = {name: layer.chosen for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.chosen = w
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.chosen = saved[name]


class HiDe(_TaskExperts):
    """HiDe-LLaVA (Guo et al., ACL 2025; Ghy0501/HiDe-LLaVA, clitmoelora.py and llava_arch.py).
    Per task, anchors: the mean frozen image feature and the mean frozen instruction embedding of
    its training items (the original: CLIP's image and text towers; the tiny LLaVA has no text
    tower, so the instruction's mean token embedding stands in). At inference the last decoder
    layer mixes the seen tasks' experts by softmax(sim / 0.1), sim the mean of the image and text
    cosines to each task's anchors; every lower layer uses the fusion of the seen experts, the sum
    of their A's times the sum of their B's, as the original's code does. Candidates are the seen
    tasks with the input's modality (the original's tasks all have images)."""

    temperature = 0.1  # llava_arch.py

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        depth = {name: int(re.search(r"layers\.(\d+)\.", name).group(1)) for name in self.layers}
        self.top = {name for name, d in depth.items() if d == max(depth.values())}
        self.anchors: dict[str, torch.Tensor] = {}

    def end_task(self, t):
        super().end_task(t)
        feats = self.features(self.stream[t].train)
        self.anchors[f"{t}.text"] = torch.stack([f["text"] for f in feats]).mean(0)  # DESIGN.md 7, hide 1
        if feats[0]["image"] is not None:
            self.anchors[f"{t}.image"] = torch.stack([f["image"] for f in feats]).mean(0)

    def weights(self, feats):
        w = torch.zeros(len(feats), len(self.stream))
        for i, f in enumerate(feats):
            tasks = self._modality_tasks(f)
            sims = [
                sum(
                    F.cosine_similarity(f[kind], self.anchors[f"{s}.{kind}"].to(f[kind].device), dim=0)
                    for kind in ("image", "text")
                    if f[kind] is not None
                )
                / (1 + (f["image"] is not None))
                for s in tasks
            ]
            w[i, tasks] = torch.softmax(torch.stack(sims).float().cpu() / self.temperature, dim=0)
        return w

    @contextlib.contextmanager
    def evaluating(self, examples):
        w = self.weights(self.features(examples))
        self._record(examples, w)
        saved = {}
        with torch.no_grad():
            for name, layer in self.layers.items():  # lower layers: expert 0 becomes the fusion of the seen ones
                if name not in self.top:
                    saved[name] = (
                        layer.lora_A[0].clone(),
                        layer.lora_B[0].clone(),
                        layer.chosen,
                    )  # only expert 0 changes
                    layer.lora_A[0] = layer.lora_A[: self.seen].sum(0)
                    layer.lora_B[0] = layer.lora_B[: self.seen].sum(0)
                    layer.chosen = F.one_hot(torch.tensor(0), len(self.stream)).float()
                else:
                    saved[name] = (None, None, layer.chosen)
                    layer.chosen = w.unsqueeze(1).to(layer.lora_A.device)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, (A, B, gate) in saved.items():
                    layer = self.layers[name]
                    if A is not None:
                        layer.lora_A[0] = A
                        layer.lora_B[0] = B
                    layer.chosen = gate

    def state_dict(self):
        return {f"anchor.{k}": v for k, v in self.anchors.items()}

    def load_state_dict(self, state):
        self.anchors = {k.removeprefix("anchor."): v for k, v in state.items()}
        self.seen = 1 + max(int(k.split(".")[0]) for k in self.anchors)


class DDAS(_TaskExperts):
    """DDAS, the distribution-discriminative auto-selector of MoE-Adapters (Yu et al., CVPR 2024;
    JiazuoYu/MoE-Adapters4CL, mtil/src/models/AutoEncoder.py and evaluation.py). After each task
    an autoencoder (d -> 100, ReLU, -> d, sigmoid; MSE) is fitted on the sigmoid of its training
    items' frozen features (image items: the vision feature; text items: the instruction's mean
    embedding; the original: AlexNet features); at inference each input goes to the expert of the
    seen task of its modality whose autoencoder reconstructs it best, or to the frozen base (no
    expert) when that error is above the autoencoder's threshold. The original's threshold (0.0655)
    belongs to AlexNet features; here each autoencoder is fitted on nine tenths of its task's
    training items, and its threshold is the mean plus three standard deviations of its errors on
    the tenth it did not see (training data only). Each task expert is one LoRA (the original's is a
    mixture of adapters with a router per task). Decided per input (the original decides per batch)."""

    code, iterations, batch, lr, weight_decay = 100, 300, 64, 0.01, 1e-4  # the original's AutoEncoder.py

    def __init__(self, cfg, model, stream, forward=None, features=None):
        super().__init__(cfg, model, stream, forward, features)
        self.encoders: dict[int, nn.Module] = {}
        self.thresholds: dict[int, float] = {}

    @staticmethod
    def _input(f: dict) -> torch.Tensor:
        return torch.sigmoid((f["image"] if f["image"] is not None else f["text"]).float().cpu())

    def end_task(self, t):
        super().end_task(t)
        every = torch.stack([self._input(f) for f in self.features(self.stream[t].train)])
        held = torch.arange(len(every)) % 10 == 9  # the threshold's tenth (at least one item)
        held[-1] |= not held.any()
        x, held_out = (every[~held] if (~held).any() else every), every[held]
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + t)
        with torch.random.fork_rng(devices=[]):  # the autoencoder lives on the CPU
            torch.manual_seed(self.cfg.seed * 1000 + t)
            ae = nn.Sequential(
                nn.Linear(x.shape[1], self.code), nn.ReLU(), nn.Linear(self.code, x.shape[1]), nn.Sigmoid()
            )
        opt = torch.optim.Adam(ae.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        per_epoch = math.ceil(len(x) / self.batch)
        for step in range(self.iterations):  # lr x 0.1 every 10 epochs, as the original's exp_lr_scheduler
            rows = torch.randint(0, len(x), (min(self.batch, len(x)),), generator=g)
            F.mse_loss(ae(x[rows]), x[rows]).backward()
            optimizer_step(opt, list(ae.parameters()), self.lr * 0.1 ** (step // per_epoch // 10), clip_norm=None)
        with torch.no_grad():
            errors = (ae(held_out) - held_out).square().mean(dim=1)
        self.encoders[t], self.thresholds[t] = (
            ae.eval().requires_grad_(False),
            (errors.mean() + 3 * errors.std(correction=0)).item(),  # DESIGN.md 7, ddas 2
        )

    def errors(self, feats: list) -> list[dict[int, float]]:
        """Each input's reconstruction error under the autoencoder of each candidate task."""
        with torch.no_grad():
            return [
                {s: (self.encoders[s](x := self._input(f)) - x).square().mean().item() for s in self._modality_tasks(f)}
                for f in feats
            ]

    def weights(self, feats):
        w = torch.zeros(len(feats), len(self.stream))
        for i, errors in enumerate(self.errors(feats)):
            best = min(errors, key=errors.get)
            if errors[best] <= self.thresholds[best]:  # above it: no expert, the frozen base
                w[i, best] = 1.0
        return w

    def state_dict(self):
        state = {f"encoder.{t}.{k}": v for t, ae in self.encoders.items() for k, v in ae.state_dict().items()}
        return state | {f"threshold.{t}": torch.tensor(v) for t, v in self.thresholds.items()}

    def load_state_dict(self, state):
        for t in sorted({int(k.split(".")[1]) for k in state if k.startswith("encoder.")}):
            d = state[f"encoder.{t}.0.weight"].shape[1]
            ae = nn.Sequential(nn.Linear(d, self.code), nn.ReLU(), nn.Linear(self.code, d), nn.Sigmoid())
            ae.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"encoder.{t}.")})
            self.encoders[t], self.thresholds[t] = ae.eval().requires_grad_(False), state[f"threshold.{t}"].item()
        self.seen = 1 + max(self.encoders)


@dataclass(frozen=True)
class Spec:
    """How the loop builds a method: its class, its adapters, and its own command-line flags."""

    cls: type
    adapters: str | None = "mixture"  # "mixture": E experts of rank r; "one": one LoRA of rank E * r (the
    # same size); "per-task": one expert per task, the same total rank split; None: no adapters
    layer: type = FusedPASsMoELinear  # the PASs layer class
    layer_args: tuple = ()  # its extra arguments, taken from the method's flags or the run's (seed)
    stabilize: bool = False  # Eq. 11 on the PASs layers (lambda_a, lambda_b, weight_clip apply)
    flags: dict = field(default_factory=dict)  # name -> engine.flags.Flag, values in cfg.method_args
    shardable: bool = False  # runs under FSDP2 (--shard)
    state_copies: float = 0  # adapter-sized fp32 tensors it keeps besides the model (the memory plan)
    saved_copies: float = 0  # how many of them its checkpoints hold (EWC, MAS: the Fisher and the anchors)


GAMMA = "F <- gamma F + F_t after each task (1: a sum over tasks; < 1: online EWC, Schwarz et al. 2018)"
METHODS = {  # the paper's Tables 1, 2 and 7, and the bounds
    "pasmoe": Spec(Stabilized, stabilize=True),  # the paper's method
    "pas-rw": Spec(Method),  # the energy gate alone
    "pasmoe-random": Spec(Stabilized, layer=PermutedWeights, layer_args=("seed",), stabilize=True),
    "l2": Spec(Stabilized, layer=UniformWeights, stabilize=True),
    "moelora": Spec(Method, layer=RoutedMoELinear),
    "moelora-topk": Spec(
        Method,
        layer=RoutedMoELinear,
        layer_args=("top_k",),
        flags={
            "top_k": Flag(2, "experts kept per token (no source gives k for the paper's Top-k row; 2 is ours)", min=1)
        },
    ),
    "seqlora": Spec(Method, adapters="one", shardable=True),  # one plain LoRA of the same total rank
    "replay": Spec(
        Replay,
        adapters="one",
        shardable=True,
        flags={
            "replay_fraction": Flag(
                0.1,
                "share of each finished task's training items kept and mixed into later tasks (ours; the paper "
                "gives none)",
                above=0,
                max=1,
            )
        },
    ),
    "joint": Spec(Joint, adapters="one", shardable=True),
    "ewc": Spec(
        EWC,
        adapters="one",
        shardable=True,
        state_copies=2,
        saved_copies=2,
        flags={
            "ewc_lambda": Flag(
                3e7, "lambda of (lambda/2) sum F (theta - theta*)^2 (DESIGN.md 7: how it was set)", min=0
            ),
            "ewc_gamma": Flag(1.0, GAMMA, min=0, max=1),
        },
    ),
    "mas": Spec(
        MAS,
        adapters="one",
        shardable=True,
        state_copies=2,
        saved_copies=2,
        flags={
            "mas_lambda": Flag(1.0, "lambda of (lambda/2) sum Omega (theta - theta*)^2 (Aljundi et al. 2018)", min=0),
            "mas_gamma": Flag(1.0, GAMMA.replace("F", "Omega"), min=0, max=1),
        },
    ),
    "lwf": Spec(
        LwF,
        adapters="one",
        state_copies=1,
        flags={
            "lwf_lambda": Flag(1.0, "weight of the distillation term (Li and Hoiem 2016)", min=0),
            "lwf_temperature": Flag(2.0, "softmax temperature T of the distillation (Li and Hoiem 2016)", above=0),
        },
    ),
    "olora": Spec(
        OLoRA,
        adapters="one",
        flags={
            "olora_lambda1": Flag(0.5, "weight of the orthogonality term (O-LoRA's code)", min=0),
            "olora_lambda2": Flag(0.0, "weight of the new slice's squared norm (O-LoRA's code)", min=0),
        },
    ),
    "seqft": Spec(SeqFT, adapters=None, shardable=True),
    "l2p": Spec(L2P, adapters=None),
    "hide": Spec(HiDe, adapters="per-task", layer=ChosenExperts),
    "ddas": Spec(DDAS, adapters="per-task", layer=ChosenExperts),
}
