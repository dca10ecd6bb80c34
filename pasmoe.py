"""PASs-MoE: a mixture of LoRA experts gated by their own activation energy.

Reference implementation of "PASs-MoE: Mitigating Misaligned Co-drift among Router and
Experts via Pathway Activation Subspaces for Continual Learning" (arXiv 2601.13020).
This file depends on torch and einops only: copy it into any project and wrap any
`nn.Linear`.

A frozen linear layer W gets E LoRA experts (A_e: r x d_in, B_e: d_out x r). For one
token h:

    z_e   = A_e h                               low-rank response          Eq. 4/8
    s_e   = ||z_e||^2 / r                       activation energy          Eq. 6
    pi    = softmax(s / tau)                    PASs-guided reweighting    Eq. 7
    y     = W h + (alpha / r) sum_e pi_e B_e z_e                           Eq. 3
    I_ek  = mean over task tokens of pi_e z_ek^2   rank importance         Eq. 9
    I_agg = sum over finished tasks of I           aggregated importance   Eq. 10
    L     = L_task + lambda_A sum w_ek ||a_ek - a*_ek||^2
                   + lambda_B sum w_ek ||b_ek - b*_ek||^2                  Eq. 11

    paper                          code
    Eq. 3, 4, 6, 7 (layer, gate)   PASsMoELinear.forward, PASsMoELinear.gate
    Eq. 9 (task importance)        track_importance, PASsMoELinear.task_importance
    Eq. 10 (aggregation, anchors)  end_task
    w = clip(I_agg / mean, 0, c)   PASsMoELinear.stab_weights
    Eq. 11 (stabilization loss)    stabilization_loss

Axis key used in shapes: n tokens (any leading dims flattened), e experts, r rank per
expert, d input features, o output features.

The gate depends on the input, so unlike a plain LoRA the update cannot be merged into W.
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
from einops import rearrange
from torch import nn

GATES = ("pas", "softmax", "topk", "single")
REGS = ("pas", "random", "uniform", "none")


@dataclass
class PASsConfig:
    num_experts: int = 6  # E, fixed for the whole stream (the method never grows the pool)
    rank: int = 8  # r, per expert: total adapter rank is E * r
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
        if self.gate not in GATES:
            raise ValueError(f"PASsConfig.gate={self.gate!r}: choose one of {GATES}")
        if self.reg not in REGS:
            raise ValueError(f"PASsConfig.reg={self.reg!r}: choose one of {REGS}")
        if self.num_experts < 1:
            raise ValueError(f"PASsConfig.num_experts={self.num_experts}: need at least 1 expert")
        if self.rank < 1:
            raise ValueError(f"PASsConfig.rank={self.rank}: the rank per expert must be >= 1")
        if self.gate == "single" and self.num_experts != 1:
            raise ValueError(f'gate="single" is one plain LoRA: set num_experts=1 (got {self.num_experts})')
        if self.gate == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"PASsConfig.top_k={self.top_k}: must lie in 1..num_experts={self.num_experts}")
        if self.temperature <= 0 or self.weight_clip <= 0:
            raise ValueError("PASsConfig.temperature and weight_clip must be positive")
        if self.adapter_dtype not in (None, "float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"PASsConfig.adapter_dtype={self.adapter_dtype!r}: a float dtype name or None")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _EnergyGate(torch.autograd.Function):
    """pi = softmax(s / tau) with the energies s_e = ||z_e||^2 / r (Eq. 6-7): (n, e, r) -> (n, e),
    in fp32 whatever z's dtype. Keeps only z and pi for backward (autograd of z.float() would
    also keep an fp32 copy of z under bf16); pi is what _MixLowRank keeps anyway."""

    @staticmethod
    def forward(ctx, z, tau):
        s = _at_least_fp32(z).square().mean(dim=-1) / tau
        pi = (s - s.amax(dim=-1, keepdim=True)).exp()
        pi = pi / pi.sum(dim=-1, keepdim=True)
        ctx.save_for_backward(z, pi)
        ctx.tau = tau
        return pi

    @staticmethod
    def backward(ctx, grad):
        z, pi = ctx.saved_tensors
        grad_s = pi * (grad - (grad * pi).sum(dim=-1, keepdim=True)) / ctx.tau  # through the softmax
        return (_at_least_fp32(z) * (grad_s * 2 / z.shape[-1]).unsqueeze(-1)).to(z.dtype), None  # ds/dz = 2 z / r


class _MixLowRank(torch.autograd.Function):
    """out = sum_e pi_e B_e z_e for every token, keeping only z and pi for backward.

    Written out, autograd would also keep z * pi (as large as z) and a permuted copy of
    B: 2.5x the activations of a plain LoRA. Here the layer keeps about what a LoRA of
    rank E*r keeps. z: (n, e, r), pi: (n, e) fp32, lora_B: (e, o, r) -> (n, o), times scaling.
    """

    @staticmethod
    def forward(ctx, z, pi, lora_B, scaling):
        ctx.save_for_backward(z, pi, lora_B)
        ctx.scaling = scaling
        gated = (z * (pi * scaling).to(z.dtype).unsqueeze(-1)).flatten(1)  # (n, e r)
        return gated @ lora_B.to(z.dtype).transpose(1, 2).flatten(0, 1)  # (n, e r) @ (e r, o)

    @staticmethod
    def backward(ctx, grad):
        z, pi, lora_B = ctx.saved_tensors
        E = pi.shape[-1]
        grad = grad.to(z.dtype) * ctx.scaling
        grad_gated = (grad @ lora_B.to(z.dtype).transpose(0, 1).flatten(1)).unflatten(1, (E, -1))  # (n, o) @ (o, e r)
        grad_z = grad_gated * pi.to(z.dtype).unsqueeze(-1)
        grad_pi = (_at_least_fp32(grad_gated) * _at_least_fp32(z)).sum(dim=-1)
        gated = (z * pi.to(z.dtype).unsqueeze(-1)).flatten(1)  # recomputed, not stored
        grad_B = (grad.T @ gated).unflatten(1, (E, -1)).transpose(0, 1)  # (o, e r) -> (e, o, r)
        return grad_z, grad_pi.to(pi.dtype), grad_B.to(lora_B.dtype), None


def _in_backward() -> bool:
    # Gradient checkpointing re-runs forwards inside the backward pass; those replays must
    # not count their tokens a second time. The autograd engine reports a graph task id
    # only while it is executing a backward pass.
    return torch._C._current_graph_task_id() != -1


class PASsMoELinear(nn.Module):
    """A frozen `nn.Linear` plus E LoRA experts mixed by the gate of `cfg.gate`.

    `index` only seeds this layer's permutation for reg="random" (`inject` numbers layers).

    Dtypes. The adapters (lora_A, lora_B, the router) and their anchors are kept in
    `cfg.adapter_dtype` (fp32 by default, also when the base is bf16: bf16 would round away
    the small updates of a low learning rate and the small drifts of Eq. 11); the forward
    computes in the input's dtype. The continual statistics (task sums, I_agg) are fp32
    always. `model.to(torch.bfloat16)` after `inject` casts the base and leaves all of these
    as they are; with adapter_dtype=None the adapters and anchors follow the base.

    The layer reads like the Linear it wraps: `weight`, `bias`, `in_features` and
    `out_features` are the base's (read-only).
    """

    _STATS = ("task_importance_sum", "importance_agg")  # fp32 whatever .to(dtype) asks

    def __init__(self, base: nn.Linear, cfg: PASsConfig, index: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"PASsMoELinear wraps an nn.Linear, got {type(base).__name__}")
        self.cfg, self.index = cfg, index
        self.base = base.requires_grad_(False)
        E, r, d, o = cfg.num_experts, cfg.rank, base.in_features, base.out_features
        dtype = getattr(torch, cfg.adapter_dtype) if cfg.adapter_dtype else base.weight.dtype
        factory = dict(device=base.weight.device, dtype=dtype)
        self.scaling = cfg.alpha / r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(E, r, d, **factory))
        self.lora_B = nn.Parameter(torch.empty(E, o, r, **factory))
        learned = cfg.gate in ("softmax", "topk")
        self.router = nn.Linear(d, E, bias=False, **factory) if learned else None

        # Continual state lives in buffers so that state_dict() carries all of it.
        stat = dict(device=base.weight.device, dtype=torch.float32)
        self.register_buffer("task_importance_sum", torch.empty(E, r, **stat))  # sum of pi_e z_ek^2
        self.register_buffer("task_tokens", torch.empty((), dtype=torch.long, device=stat["device"]))
        self.register_buffer("importance_agg", torch.empty(E, r, **stat))  # Eq. 10
        self.register_buffer("anchor_A", torch.empty_like(self.lora_A))  # a* (rows of A)
        self.register_buffer("anchor_B", torch.empty_like(self.lora_B))  # b* (columns of B)
        # reg="random": a fixed function of (seed, index), rebuilt by reset_parameters and not
        # saved, so adapter state loads across reg modes.
        self.register_buffer("perm", torch.empty(E * r, dtype=torch.long, device=stat["device"]), persistent=False)
        self._token_mask = None  # set by track_importance while it is active
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert's A like one LoRA A (loralib, PEFT), B = 0 (so the layer starts equal
        to its base), anchors = adapters, statistics zero. Also what to call after
        building on the meta device and `to_empty()` (the base resets itself)."""
        for A_e in self.lora_A:
            nn.init.kaiming_uniform_(A_e, a=math.sqrt(5))
        self.lora_B.zero_()
        if self.router is not None:
            self.router.reset_parameters()
        self.anchor_A.copy_(self.lora_A)
        self.anchor_B.copy_(self.lora_B)
        self.task_importance_sum.zero_()
        self.task_tokens.zero_()
        self.importance_agg.zero_()
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.index)
        self.perm.copy_(torch.randperm(self.perm.numel(), generator=g))

    def _apply(self, fn, recurse=True):
        # Module.to / .half / .cuda all end here. Tensors whose dtype is fixed (statistics
        # always, adapters and anchors under cfg.adapter_dtype) move to fn's device but keep
        # their dtype, converted from the original values (no round trip through bf16).
        fixed = [getattr(self, n) for n in self._STATS]
        if self.cfg.adapter_dtype:
            fixed += [self.anchor_A, self.anchor_B, *self.adapter_parameters()]
            fixed += [p.grad for p in self.adapter_parameters() if p.grad is not None]
        fixed = {id(t) for t in fixed}

        def keep_dtype(t):
            out = fn(t)
            return t.to(device=out.device) if id(t) in fixed and out.dtype != t.dtype else out

        return super()._apply(keep_dtype, recurse)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What trains: the experts' A and B, and the router of a learned gate."""
        return [self.lora_A, self.lora_B, *(self.router.parameters() if self.router is not None else ())]

    # the wrapped Linear's attributes, read-only: code that inspects a Linear keeps working
    weight = property(lambda self: self.base.weight, doc="the frozen base weight (o, d)")
    bias = property(lambda self: self.base.bias, doc="the frozen base bias (o,) or None")
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"experts={c.num_experts}, rank={c.rank}, gate={c.gate}, reg={c.reg}, scaling={self.scaling:g}"

    # ---- the gate (Eq. 6-7 and the baselines' routers) ----

    def _mixture(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Mixture weights pi (..., e), fp32, from the input x (..., d) and responses z (..., e, r)."""
        if self.cfg.gate == "single":
            return torch.ones(z.shape[:-1], device=z.device)
        if self.cfg.gate == "pas":  # energy s_e = ||z_e||^2 / r, in fp32 also under bf16
            return _EnergyGate.apply(z, self.cfg.temperature)
        logits = F.linear(x, self.router.weight.to(x.dtype)).float()
        if self.cfg.gate == "topk":  # keep the k largest logits, softmax over them only
            top = logits.topk(self.cfg.top_k, dim=-1).indices
            kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            logits = logits.masked_fill(~kept, float("-inf"))
        return torch.softmax(logits / self.cfg.temperature, dim=-1)

    def _responses(self, h: torch.Tensor) -> torch.Tensor:
        """z_e = A_e h for all experts in one GEMM: (..., d) -> (..., e, r), in h's dtype."""
        A_cat = self.lora_A.to(h.dtype).flatten(0, 1)  # (e r, d)
        return F.linear(h, A_cat).unflatten(-1, (self.cfg.num_experts, self.cfg.rank))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Mixture weights pi: (..., d) -> (..., e), fp32; each row sums to 1."""
        return self._mixture(x, self._responses(self.drop(x)))

    # ---- forward (Eq. 3) ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., o). Two GEMMs of total rank E*r; the gate (and the LoRA scaling)
        acts in rank space, never on d_out-wide outputs."""
        z = self._responses(self.drop(x))  # (..., e, r)
        pi = self._mixture(x, z)  # (..., e)
        if self._token_mask is not None and not _in_backward():
            self._accumulate(z.detach(), pi.detach())
        E, r = self.cfg.num_experts, self.cfg.rank
        delta = _MixLowRank.apply(z.reshape(-1, E, r), pi.reshape(-1, E), self.lora_B, self.scaling)
        return self.base(x) + delta.view(*x.shape[:-1], -1)

    # ---- importance (Eq. 9-10) ----

    def _accumulate(self, z: torch.Tensor, pi: torch.Tensor) -> None:
        mask = self._token_mask
        if mask is True:  # track_importance(token_mask=None): every token counts
            mask = torch.ones(z.shape[:-2], dtype=torch.bool, device=z.device)
        if mask.shape != z.shape[:-2]:
            raise ValueError(
                f"token_mask has shape {tuple(mask.shape)} but this layer sees tokens of shape "
                f"{tuple(z.shape[:-2])}: pass the attention mask that matches the hidden states"
            )
        pad = ~mask.to(device=z.device, dtype=torch.bool).reshape(-1, 1, 1)  # (n, 1, 1)
        z = z.reshape(-1, *z.shape[-2:]).float().masked_fill(pad, 0.0)  # (n, e, r); padding gives 0, even if inf
        pi = pi.reshape(-1, pi.shape[-1]).masked_fill(pad[:, 0], 0.0)  # (n, e)
        self.task_importance_sum += torch.einsum("ne,ner->er", pi, z.square())
        self.task_tokens += (~pad).sum()

    def task_importance(self) -> torch.Tensor:
        """I(t) of Eq. 9: (e, r), the mean of pi_e z_ek^2 over the tokens counted so far."""
        if self.task_tokens.item() == 0:
            raise RuntimeError(
                "no tokens were counted for this task: run forwards inside "
                "`with track_importance(model, token_mask):` before end_task"
            )
        return self.task_importance_sum / self.task_tokens

    def stab_weights(self) -> torch.Tensor:
        """w = clip(I_agg / mean(I_agg), 0, c): (e, r); zeros before the first end_task.
        reg="random" permutes these values; reg="uniform" makes every w 1 once a task ended."""
        agg = self.importance_agg
        w = (agg / agg.mean().clamp_min(torch.finfo(agg.dtype).tiny)).clamp(0, self.cfg.weight_clip)
        if self.cfg.reg == "random":  # same values, no targeting (paper Table 7)
            w = w.flatten()[self.perm].view_as(w)
        elif self.cfg.reg == "uniform":  # plain L2 to the anchor: what importance adds is absent
            w = torch.ones_like(w) if agg.any() else torch.zeros_like(w)
        return w


# ---- model-level helpers ----


def pas_layers(model: nn.Module) -> dict[str, PASsMoELinear]:
    """All PASs layers of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PASsMoELinear)}


def inject(model: nn.Module, cfg: PASsConfig, target: str = r"(q|k|v|o|gate|up|down)_proj$",
           freeze_others: bool = True) -> list[str]:
    """Replace every nn.Linear whose full name matches `target` (re.search) by a PASs layer.

    Returns the wrapped names. freeze_others=True (the default, as PEFT's get_peft_model and
    loralib's mark_only_lora_as_trainable do) leaves only the adapters trainable: embeddings,
    norms, heads and every other weight of the model are frozen. freeze_others=False freezes
    only the wrapped bases; the rest keeps its requires_grad.

    A Linear shared under several names (tied modules) is wrapped once and the one PASs
    layer is put under every name, so the modules stay tied; a warning names them. A Linear
    whose parent reads its weight instead of calling it (nn.MultiheadAttention.out_proj) is
    refused: the adapters would never run.
    """
    if pas_layers(model):
        raise RuntimeError("this model already holds PASs layers; inject into a fresh model")
    pattern = re.compile(target)
    by_module: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) and pattern.search(name):
            by_module.setdefault(id(module), []).append(name)
    if not by_module:
        raise ValueError(f"no nn.Linear in the model matches target={target!r}")
    for names in by_module.values():
        parent_name = names[0].rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
            raise ValueError(f"{names[0]}: nn.MultiheadAttention reads out_proj.weight directly and never "
                             f"calls it, so adapters there would do nothing; narrow target={target!r}")
        if len(names) > 1:
            warnings.warn(f"one nn.Linear is shared under the names {names}: it gets one PASs layer, "
                          f"shared the same way", stacklevel=2)
    if freeze_others:
        model.requires_grad_(False)
    wrapped = []
    for index, names in enumerate(by_module.values()):
        layer = PASsMoELinear(model.get_submodule(names[0]), cfg, index=index)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
        wrapped += names
    return wrapped


@contextlib.contextmanager
def track_importance(model: nn.Module, token_mask: torch.Tensor | None = None):
    """While active, each PASs layer adds sum_tokens pi_e z_ek^2 and its token count.

    token_mask: (b, n) bool (the attention mask; padding = False), or None for all tokens.
    Forwards replayed by gradient checkpointing inside backward are not counted. Nesting
    works: an inner context's mask holds inside it, and the outer one's again after it.
    """
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
    """Close a task: I_agg += I(t) (Eq. 10), anchors <- current A and B, reset counters.

    Under torch.distributed the per-rank sums and token counts are all-reduced first, so
    every rank ends with the same statistics.
    """
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


class _WeightedDrift(torch.autograd.Function):
    """Eq. 11's two sums for one layer, in fp32: (sum_ek w_ek ||A[e, k, :] - A*[e, k, :]||^2,
    sum_ek w_ek ||B[e, :, k] - B*[e, :, k]||^2) as a (2,) tensor. Backward recomputes the
    differences from the adapters and anchors, which live anyway, so the loss keeps no
    adapter-sized tensor of its own between forward and backward."""

    @staticmethod
    def forward(ctx, A, anchor_A, B, anchor_B, w):
        ctx.save_for_backward(A, anchor_A, B, anchor_B, w)
        a = (w * (_at_least_fp32(A) - _at_least_fp32(anchor_A)).square().sum(dim=2)).sum()  # rows of A: (e, r, d)
        b = (w * (_at_least_fp32(B) - _at_least_fp32(anchor_B)).square().sum(dim=1)).sum()  # columns of B: (e, o, r)
        return torch.stack([a, b])

    @staticmethod
    def backward(ctx, grad):
        A, anchor_A, B, anchor_B, w = ctx.saved_tensors
        grad_A = (_at_least_fp32(A) - _at_least_fp32(anchor_A)) * (2 * grad[0] * w).unsqueeze(2)
        grad_B = (_at_least_fp32(B) - _at_least_fp32(anchor_B)) * (2 * grad[1] * w).unsqueeze(1)
        return grad_A.to(A.dtype), None, grad_B.to(B.dtype), None, None


StabLoss = namedtuple("StabLoss", "total a b")


def stabilization_loss(model: nn.Module) -> StabLoss:
    """Eq. 11 summed over all PASs layers: total = lambda_a * a + lambda_b * b.

    a = sum_ek w_ek ||A[e, k, :] - A*[e, k, :]||^2   (rows of A)
    b = sum_ek w_ek ||B[e, :, k] - B*[e, :, k]||^2   (columns of B)

    Layers whose weights are all zero (every layer during the first task) are skipped.
    """
    layers = [layer for layer in pas_layers(model).values() if layer.cfg.reg != "none"]
    weights = [layer.stab_weights() for layer in layers]  # (e, r) each
    active = torch.stack([w.any() for w in weights]).tolist() if weights else []  # one sync
    on = [(layer, w) for layer, w, yes in zip(layers, weights, active) if yes]
    if not on:
        zero = torch.zeros((), device=layers[0].lora_A.device if layers else None)
        return StabLoss(zero, zero, zero)
    drift = torch.stack([_WeightedDrift.apply(l.lora_A, l.anchor_A, l.lora_B, l.anchor_B, w) for l, w in on])  # (layers, 2)
    lambdas = torch.tensor([[l.cfg.lambda_a, l.cfg.lambda_b] for l, _ in on], device=drift.device)
    a, b = drift.sum(dim=0)
    return StabLoss((drift * lambdas).sum(), a, b)
