"""PASs-MoE: a mixture of LoRA experts gated by their own activation energy.

Reference implementation of "PASs-MoE: Mitigating Misaligned Co-drift among Router and
Experts via Pathway Activation Subspaces for Continual Learning" (arXiv 2601.13020). It
depends on torch only: copy this file into any project and wrap any `nn.Linear`.

A frozen linear layer W gets E LoRA experts, A_e (r x d_in) and B_e (d_out x r). For a token h:

    z_e   = A_e h                                low-rank response            Eq. 4, 8
    s_e   = ||z_e||^2 / r                        activation energy            Eq. 6
    pi    = softmax(s / tau)                     the gate; there is no router Eq. 7
    y     = W h + (alpha / r) sum_e pi_e B_e z_e                              Eq. 3
    I_ek  = mean over task tokens of pi_e z_ek^2   rank importance            Eq. 9
    I_agg = sum over finished tasks of I           aggregated importance      Eq. 10
    w     = clip(I_agg / mean(I_agg), 0, c)        per layer                  section 4.3
    L     = L_task + lambda_A sum_ek w_ek ||a_ek - a*_ek||^2
                   + lambda_B sum_ek w_ek ||b_ek - b*_ek||^2                  Eq. 11

a_ek is row k of A_e, b_ek column k of B_e; a*, b* their values when the last task ended. Below in this
order: config, layer, importance, stabilization, inject, autograd Functions. Shapes: n tokens, e experts,
r rank per expert, d in, o out. The gate depends on the input, so the layer cannot be merged into W.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATES, REGS = ("pas", "softmax", "topk", "single"), ("pas", "random", "uniform", "none")


@dataclass
class PASsConfig:
    num_experts: int = 6  # E, fixed for the whole stream (the method never grows the pool)
    rank: int = 8  # r, per expert: the total adapter rank is E * r
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (LoRA convention)
    gate: str = "pas"  # "pas" energy gate | "softmax" / "topk" learned router | "single" plain LoRA
    top_k: int = 2  # experts kept per token by gate="topk"
    temperature: float = 1.0  # tau in softmax(s / tau); 1 reproduces the paper's Eq. 7
    lambda_a: float = 5e-4  # weight of the A-row stabilization term (paper section 5.1)
    lambda_b: float = 5e-5  # weight of the B-column stabilization term (paper section 5.1)
    weight_clip: float = 10.0  # c in w = clip(I_agg / mean(I_agg), 0, c)
    reg: str = "pas"  # "pas" importance weights | "random" the same weights permuted | "uniform" w = 1 | "none"
    seed: int = 0  # seeds the permutation of reg="random" (one per layer)
    adapter_dtype: str | None = "float32"  # adapters, router and anchors; None: the base's dtype

    def __post_init__(self):
        for ok, problem in [
            (self.gate in GATES and self.reg in REGS, f"gate={self.gate!r}, reg={self.reg!r}: choose from {GATES}, {REGS}"),
            (self.num_experts >= 1 and self.rank >= 1, f"num_experts={self.num_experts}, rank={self.rank}: both >= 1"),
            (self.gate != "single" or self.num_experts == 1, 'gate="single" is one plain LoRA: set num_experts=1'),
            (self.gate != "topk" or 1 <= self.top_k <= self.num_experts, f"top_k={self.top_k}: must lie in 1..num_experts"),
            (self.temperature > 0 and self.weight_clip > 0, "temperature and weight_clip must be positive"),
            (self.adapter_dtype in (None, "float32", "bfloat16", "float16", "float64"), "adapter_dtype: a float dtype or None"),
        ]:
            if not ok:
                raise ValueError(f"PASsConfig.{problem}")


class PASsMoELinear(nn.Module):
    """A frozen `nn.Linear` plus E LoRA experts, mixed by the gate that `cfg.gate` names. Adapters, router
    and anchors keep cfg.adapter_dtype (fp32 by default, also under a bf16 base, which would round away
    small updates and the small drifts of Eq. 11); statistics are fp32. `given_gate` (None, or pi of shape
    (..., e)) replaces the gate. `index` seeds the permutation of reg="random" (`inject` counts layers)."""

    def __init__(self, base: nn.Linear, cfg: PASsConfig, index: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"PASsMoELinear wraps an nn.Linear, got {type(base).__name__}")
        self.cfg, self.index, self.base = cfg, index, base.requires_grad_(False)
        E, r, d, o = cfg.num_experts, cfg.rank, base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=getattr(torch, cfg.adapter_dtype or "", base.weight.dtype))
        self.scaling = cfg.alpha / r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(E, r, d, **kw))  # A_e = lora_A[e]
        self.lora_B = nn.Parameter(torch.empty(E, o, r, **kw))  # B_e = lora_B[e]
        self.router = nn.Linear(d, E, bias=False, **kw) if cfg.gate in ("softmax", "topk") else None
        fp32 = dict(device=kw["device"], dtype=torch.float32)  # the continual state: buffers, so state_dict() holds it
        self.register_buffer("task_importance_sum", torch.empty(E, r, **fp32))  # sum of pi_e z_ek^2 (Eq. 9)
        self.register_buffer("task_tokens", torch.empty((), dtype=torch.long, device=kw["device"]))
        self.register_buffer("importance_agg", torch.empty(E, r, **fp32))  # Eq. 10
        self.register_buffer("anchor_A", torch.empty_like(self.lora_A))  # a*: rows of A when the last task ended
        self.register_buffer("anchor_B", torch.empty_like(self.lora_B))  # b*: columns of B
        self.register_buffer("perm", torch.empty(E * r, dtype=torch.long, device=kw["device"]), persistent=False)
        self.given_gate = self._token_mask = None  # _token_mask: set while track_importance is active
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A_e as a LoRA's A, B = 0 (the layer starts as its base), anchors = adapters, statistics 0; also after to_empty()."""
        for A_e in self.lora_A:
            nn.init.kaiming_uniform_(A_e, a=math.sqrt(5))
        self.lora_B.zero_()
        if self.router is not None:
            self.router.reset_parameters()
        self.anchor_A.copy_(self.lora_A), self.anchor_B.copy_(self.lora_B)
        for stat in (self.task_importance_sum, self.task_tokens, self.importance_agg):
            stat.zero_()
        seeded = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.index)  # reg="random"; not saved
        self.perm.copy_(torch.randperm(self.perm.numel(), generator=seeded))

    def _responses(self, h: torch.Tensor) -> torch.Tensor:
        """z_e = A_e h for all experts in one GEMM with A_cat (e r, d): (..., d) -> (..., e, r), in h's dtype."""
        return F.linear(h, self.lora_A.to(h.dtype).flatten(0, 1)).unflatten(-1, (self.cfg.num_experts, self.cfg.rank))

    def _mixture(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The mixture weights pi (..., e), fp32, from the input x (..., d) and the responses z."""
        if self.given_gate is not None:  # chosen from outside
            return torch.broadcast_to(self.given_gate.to(z.device, torch.float32), z.shape[:-1])
        if self.cfg.gate == "single":
            return torch.ones(z.shape[:-1], device=z.device)
        if self.cfg.gate == "pas":  # Eq. 6-7: softmax of the energies ||z_e||^2 / r, in fp32
            return (_EnergyGate.apply if torch.is_grad_enabled() else _EnergyGate.pi)(z, self.cfg.temperature)
        logits = F.linear(x, self.router.weight.to(x.dtype)).float()  # MoELoRA's learned router
        if self.cfg.gate == "topk":  # keep the k largest logits, softmax over them only
            top = logits.topk(self.cfg.top_k, dim=-1).indices
            logits = logits.masked_fill(~torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True), -math.inf)
        return torch.softmax(logits / self.cfg.temperature, dim=-1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights pi: (..., d) -> (..., e), fp32; each row sums to 1."""
        return self._mixture(x, self._responses(self.drop(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., o), Eq. 3: two GEMMs of total rank E*r, the gate applied in rank space."""
        z = self._responses(self.drop(x))  # (..., e, r)
        pi = self._mixture(x, z)  # (..., e)
        if self._token_mask is not None and torch._C._current_graph_task_id() == -1:  # not a checkpoint replay
            _count(self, z.detach(), pi.detach())  # Eq. 9; replays of gradient checkpointing run inside backward
        mix = _MixLowRank.apply if torch.is_grad_enabled() else _MixLowRank.mix  # no graph: no Function needed
        delta = mix(z.reshape(-1, *z.shape[-2:]), pi.reshape(-1, pi.shape[-1]), self.lora_B, self.scaling)  # (n, o)
        return self.base(x) + delta.reshape(*x.shape[:-1], delta.shape[-1])

    def task_importance(self) -> torch.Tensor:
        """I(t) of Eq. 9: (e, r), the mean of pi_e z_ek^2 over the tokens counted so far."""
        if self.task_tokens.item() == 0:
            raise RuntimeError("no tokens were counted for this task: run forwards in track_importance() before end_task")
        return self.task_importance_sum / self.task_tokens

    def stab_weights(self) -> torch.Tensor:
        """w = clip(I_agg / mean(I_agg), 0, c): (e, r), 0 before the first end_task. reg="random":
        these values permuted (paper Table 7); "uniform": w = 1 once a task ended (plain L2)."""
        agg = self.importance_agg
        w = (agg / agg.mean().clamp_min(torch.finfo(agg.dtype).tiny)).clamp(0, self.cfg.weight_clip)
        if self.cfg.reg == "random":
            return w.flatten()[self.perm].view_as(w)
        if self.cfg.reg == "uniform":
            return torch.ones_like(w) if agg.any() else torch.zeros_like(w)
        return w

    weight = property(lambda self: self.base.weight, doc="the frozen base weight (o, d)")  # read like the Linear
    bias = property(lambda self: self.base.bias, doc="the frozen base bias (o,) or None")
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def _apply(self, fn, recurse=True):
        # .to / .half / .cuda: statistics (and adapters, grads, anchors under adapter_dtype) keep their dtype
        keep = [self.task_importance_sum, self.importance_agg]
        if self.cfg.adapter_dtype:
            params = [self.lora_A, self.lora_B, *(self.router.parameters() if self.router is not None else ())]
            keep += [self.anchor_A, self.anchor_B, *params, *(p.grad for p in params if p.grad is not None)]
        keep = {id(t) for t in keep}
        return super()._apply(lambda t: t.to(out.device) if (out := fn(t)).dtype != t.dtype and id(t) in keep else out, recurse)


# ---- importance over a task (Eq. 9) and its end (Eq. 10) ----
def _count(layer: PASsMoELinear, z: torch.Tensor, pi: torch.Tensor) -> None:
    """Add sum_tokens pi_e z_ek^2 and the token count; z: (..., e, r), pi: (..., e); padding never counts."""
    mask = torch.ones(z.shape[:-2], dtype=torch.bool, device=z.device) if layer._token_mask is True else layer._token_mask
    if mask.shape != z.shape[:-2]:
        raise ValueError(f"token_mask has shape {tuple(mask.shape)}, the tokens {tuple(z.shape[:-2])}: pass their attention mask")
    pad = ~mask.to(z.device, torch.bool).reshape(-1, 1, 1)  # (n, 1, 1)
    z = z.reshape(-1, *z.shape[-2:]).float().masked_fill(pad, 0.0)  # (n, e, r); padding gives 0, even if inf
    pi = pi.reshape(-1, pi.shape[-1]).float().masked_fill(pad[:, 0], 0.0)  # (n, e)
    layer.task_importance_sum += torch.einsum("ne,ner->er", pi, z.square())
    layer.task_tokens += (~pad).sum()


@contextlib.contextmanager
def track_importance(model: nn.Module, token_mask: torch.Tensor | None = None):
    """While active, PASs layers count tokens for Eq. 9: token_mask (b, n), the attention mask, or None (all)."""
    layers = list(pas_layers(model).values())
    outer = [layer._token_mask for layer in layers]
    for layer in layers:
        layer._token_mask = True if token_mask is None else token_mask
    try:
        yield
    finally:
        for layer, mask in zip(layers, outer):
            layer._token_mask = mask


@torch.no_grad()
def end_task(model: nn.Module) -> None:
    """I_agg += I(t) (Eq. 10), anchors <- A and B, counters reset; under torch.distributed, all-reduced."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for layer in pas_layers(model).values():
        if distributed:
            torch.distributed.all_reduce(layer.task_importance_sum)
            torch.distributed.all_reduce(layer.task_tokens)
        layer.importance_agg += layer.task_importance()
        layer.anchor_A.copy_(layer.lora_A)
        layer.anchor_B.copy_(layer.lora_B)
        layer.task_importance_sum.zero_()
        layer.task_tokens.zero_()


# ---- stabilization (Eq. 11) ----
StabLoss = namedtuple("StabLoss", "total a b")


def stabilization_loss(model: nn.Module) -> StabLoss:
    """Eq. 11 over all PASs layers: lambda_a * a + lambda_b * b (_WeightedDrift); layers with w = 0 (first task) skipped."""
    layers = [layer for layer in pas_layers(model).values() if layer.cfg.reg != "none"]
    weights = [layer.stab_weights() for layer in layers]  # (e, r) each
    active = torch.stack([w.any() for w in weights]).tolist() if weights else []  # one sync
    on = [(layer, w) for layer, w, yes in zip(layers, weights, active) if yes]
    if not on:
        return StabLoss(*[torch.zeros((), device=layers[0].lora_A.device if layers else None)] * 3)
    drift = torch.stack([_WeightedDrift.apply(l.lora_A, l.anchor_A, l.lora_B, l.anchor_B, w) for l, w in on])  # (layers, 2)
    lambdas = torch.tensor([[l.cfg.lambda_a, l.cfg.lambda_b] for l, _ in on], device=drift.device)
    a, b = drift.sum(dim=0)
    return StabLoss((drift * lambdas).sum(), a, b)


# ---- putting the layer into a model ----
def pas_layers(model: nn.Module) -> dict[str, PASsMoELinear]:
    """All PASs layers of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PASsMoELinear)}


def inject(model: nn.Module, cfg: PASsConfig, target: str = r"(q|k|v|o|gate|up|down)_proj$", freeze_others=True) -> list[str]:
    """Replace each nn.Linear whose full name matches `target` (re.search) by a PASs layer; returns the
    names. freeze_others: only adapters train (PEFT's convention), else only wrapped bases freeze. A
    shared Linear gets one PASs layer under every name; MultiheadAttention.out_proj is refused."""
    if pas_layers(model):
        raise RuntimeError("this model already holds PASs layers; inject into a fresh model")
    by_module: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) and re.search(target, name):
            by_module.setdefault(id(module), []).append(name)
    if not by_module:
        raise ValueError(f"no nn.Linear in the model matches target={target!r}")
    for names in by_module.values():
        if isinstance(model.get_submodule(names[0].rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"{names[0]}: nn.MultiheadAttention reads out_proj.weight, never calls it; narrow target")
        if len(names) > 1:
            warnings.warn(f"one nn.Linear is shared under the names {names}: it gets one PASs layer, shared too", stacklevel=2)
    if freeze_others:
        model.requires_grad_(False)
    for index, names in enumerate(by_module.values()):
        layer = PASsMoELinear(model.get_submodule(names[0]), cfg, index=index)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return [name for names in by_module.values() for name in names]


# ---- three autograd Functions: they keep for backward only tensors that live anyway (or tiny ones) ----
def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _EnergyGate(torch.autograd.Function):
    """pi = softmax(s / tau), s_e = ||z_e||^2 / r (Eq. 6-7): (n, e, r) -> (n, e) fp32; no fp32 copy of z."""

    pi = staticmethod(lambda z, tau: torch.softmax(_at_least_fp32(z).square().mean(dim=-1) / tau, dim=-1))

    @staticmethod
    def forward(ctx, z, tau):
        pi = _EnergyGate.pi(z, tau)
        ctx.save_for_backward(z, pi)
        ctx.tau = tau
        return pi

    @staticmethod
    def backward(ctx, grad):
        z, pi = ctx.saved_tensors
        grad_s = pi * (grad - (grad * pi).sum(dim=-1, keepdim=True)) / ctx.tau  # through the softmax
        return (_at_least_fp32(z) * (grad_s * 2 / z.shape[-1]).unsqueeze(-1)).to(z.dtype), None  # ds/dz = 2 z / r


class _MixLowRank(torch.autograd.Function):
    """scaling * sum_e pi_e B_e z_e: (n, e, r), (n, e), (e, o, r) -> (n, o); keeps no z * pi nor permuted B."""

    mix = staticmethod(lambda z, pi, lora_B, scaling:  # (n, e r) @ (e r, o)
                       (z * (pi * scaling).to(z.dtype).unsqueeze(-1)).flatten(1) @ lora_B.to(z.dtype).transpose(1, 2).flatten(0, 1))

    @staticmethod
    def forward(ctx, z, pi, lora_B, scaling):
        ctx.save_for_backward(z, pi, lora_B)
        ctx.scaling = scaling
        return _MixLowRank.mix(z, pi, lora_B, scaling)

    @staticmethod
    def backward(ctx, grad):
        z, pi, lora_B = ctx.saved_tensors
        grad = grad.to(z.dtype) * ctx.scaling
        grad_gated = (grad @ lora_B.to(z.dtype).transpose(0, 1).flatten(1)).view_as(z)  # (n, o) @ (o, e r)
        grad_pi = (_at_least_fp32(grad_gated) * _at_least_fp32(z)).sum(dim=-1)
        gated = (z * pi.to(z.dtype).unsqueeze(-1)).flatten(1)  # recomputed, not stored
        grad_B = (grad.T @ gated).unflatten(1, z.shape[1:]).transpose(0, 1)  # (o, e r) -> (e, o, r)
        return grad_gated * pi.to(z.dtype).unsqueeze(-1), grad_pi.to(pi.dtype), grad_B.to(lora_B.dtype), None


class _WeightedDrift(torch.autograd.Function):
    """(sum_ek w_ek ||A[e, k, :] - A*[e, k, :]||^2, sum_ek w_ek ||B[e, :, k] - B*[e, :, k]||^2), fp32."""

    @staticmethod
    def forward(ctx, A, anchor_A, B, anchor_B, w):
        ctx.save_for_backward(A, anchor_A, B, anchor_B, w)
        a = (w * (_at_least_fp32(A) - _at_least_fp32(anchor_A)).square().sum(dim=2)).sum()  # A: (e, r, d)
        b = (w * (_at_least_fp32(B) - _at_least_fp32(anchor_B)).square().sum(dim=1)).sum()  # B: (e, o, r)
        return torch.stack([a, b])

    @staticmethod
    def backward(ctx, grad):
        A, anchor_A, B, anchor_B, w = ctx.saved_tensors
        grad_A = (_at_least_fp32(A) - _at_least_fp32(anchor_A)) * (2 * grad[0] * w).unsqueeze(2)
        grad_B = (_at_least_fp32(B) - _at_least_fp32(anchor_B)) * (2 * grad[1] * w).unsqueeze(1)
        return grad_A.to(A.dtype), None, grad_B.to(B.dtype), None, None
