"""PASs-MoE (arXiv 2601.13020): LoRA experts mixed by their own activation energy, and a penalty that holds
still the rank directions that earlier tasks relied on. A frozen nn.Linear W (o x d) gets E LoRA experts
A_e (r x d) and B_e (o x r); for a token h:

    Eq. 4   z_e    = A_e h                                  the expert's low-rank response
    Eq. 6   s_e    = ||z_e||^2 / r                          its activation energy
    Eq. 7   pi     = softmax(s / tau)                       the gate: no router
    Eq. 3   y      = W h + (alpha / r) sum_e pi_e B_e z_e
    Eq. 9   I_ek   = mean over task t's tokens of pi_e z_ek^2   rank importance
    Eq. 10  I_agg  = sum of I over the tasks so far
    4.3     w      = clip(I_agg / mean(I_agg), 0, c)        per layer
    Eq. 11  L      = L_task + lambda_A sum_ek w_ek ||a_ek - a*_ek||^2 + lambda_B sum_ek w_ek ||b_ek - b*_ek||^2

a_ek is row k of A_e, b_ek column k of B_e, a*, b* their values when the last task ended. Axes: ... any
leading axes (batch, tokens), n tokens, d in, o out, e experts, r rank per expert. The gate depends on the
input, so the layer cannot be merged into W. Needs torch and einops only: copy it into any project.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass

import torch
from einops import einsum, reduce
from torch import nn

LLAMA_LINEARS = r"(q|k|v|o|gate|up|down)_proj$"  # every linear layer of a Llama decoder layer: the paper's targets


@dataclass
class PASsConfig:
    num_experts: int = 6  # E, fixed for the whole stream; E = 1 is a plain LoRA (its gate is 1)
    rank: int = 8  # r per expert: the experts together have rank E * r
    alpha: float = 16.0  # LoRA alpha: each expert's update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input only, as LoRA does
    temperature: float = 1.0  # tau of Eq. 7; 1 is the paper's gate
    lambda_a: float = 5e-4  # Eq. 11, A rows (paper 5.1)
    lambda_b: float = 5e-5  # Eq. 11, B columns (paper 5.1; its 5.3.2 prefers 2.5e-4)
    weight_clip: float = 10.0  # c (the authors' benchmark code)
    stabilize: bool = True  # add Eq. 11 (False: the gate alone, PASs-RW; no anchors are kept)
    adapter_dtype: str | None = "float32"  # A, B and anchors (None: the base's dtype); statistics are fp32 always

    def __post_init__(self):
        if min(self.num_experts, self.rank, self.alpha, self.temperature, self.weight_clip) <= 0:
            raise ValueError(f"PASsConfig: num_experts, rank, alpha, temperature, weight_clip must be > 0: {self}")


class PASsMoELinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts mixed by the energy gate; `index` counts the layers of a model."""

    def __init__(self, base: nn.Linear, cfg: PASsConfig, index: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"PASsMoELinear wraps an nn.Linear, got {type(base).__name__}")
        self.cfg, self.index, self.base = cfg, index, base.requires_grad_(False)
        E, r, d, o, device = cfg.num_experts, cfg.rank, base.in_features, base.out_features, base.weight.device
        # fp32 adapters under a bf16 base: bf16 would round away small updates and the drifts of Eq. 11
        dtype = getattr(torch, cfg.adapter_dtype) if cfg.adapter_dtype else base.weight.dtype
        self.scaling = cfg.alpha / r
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(E, r, d, device=device, dtype=dtype))  # A_e = lora_A[e]
        self.lora_B = nn.Parameter(torch.empty(E, o, r, device=device, dtype=dtype))  # B_e = lora_B[e]
        # The continual state, as buffers so that state_dict() holds it; sums in fp32.
        self.register_buffer("task_importance_sum", torch.zeros(E, r, device=device))  # sum of pi_e z_ek^2, Eq. 9
        self.register_buffer("task_tokens", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("importance_agg", torch.zeros(E, r, device=device))  # Eq. 10
        if cfg.stabilize:  # a*, b*: A and B when the last task ended (only Eq. 11 reads them)
            self.register_buffer("anchor_A", torch.empty_like(self.lora_A))
            self.register_buffer("anchor_B", torch.empty_like(self.lora_B))
        self._token_mask = None  # set by track_importance
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's init (A kaiming-uniform, B = 0: the layer starts as its base); also after to_empty()."""
        for A_e in self.lora_A:  # one LoRA A per expert
            nn.init.kaiming_uniform_(A_e, a=math.sqrt(5))
        self.lora_B.zero_()
        self.task_importance_sum.zero_(), self.task_tokens.zero_(), self.importance_agg.zero_()
        if self.cfg.stabilize:
            self.anchor_A.copy_(self.lora_A), self.anchor_B.copy_(self.lora_B)

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 4, all experts at once: (..., d) -> z (..., e, r), in x's dtype."""
        return einsum(self.drop(x), self.lora_A.to(x.dtype), "... d, e r d -> ... e r")

    def gate(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """pi (..., e), rows summing to 1 (z: the responses, if at hand). Baselines override it (a router)."""
        z = self.responses(x) if z is None else z
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # at least fp32: in bf16 the gate moves by 1e-2
        energy = reduce(z.square(), "... e r -> ... e", "mean")  # Eq. 6: s_e = ||z_e||^2 / r
        return torch.softmax(energy / self.cfg.temperature, dim=-1)  # Eq. 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., o). The gate acts in rank space: no o-wide output per expert is built."""
        z = self.responses(x)
        pi = self.gate(x, z)
        if self._token_mask is not None:
            self._count(z, pi)
        gated = z * pi.to(z.dtype).unsqueeze(-1)  # pi_e z_e: (..., e, r)
        # Eq. 3: sum_e pi_e B_e z_e is one contraction over (e, r), the cost of one LoRA of rank E * r
        return self.base(x) + self.scaling * einsum(gated, self.lora_B.to(x.dtype), "... e r, e o r -> ... o")

    def _count(self, z: torch.Tensor, pi: torch.Tensor) -> None:
        """Eq. 9's running sums over the counted tokens; padding never counts."""
        if torch.is_grad_enabled():  # gradient checkpointing replays a forward in backward: counted twice
            raise RuntimeError("track_importance counts in a no-grad statistics pass: wrap it in torch.no_grad()")
        mask = (torch.ones(z.shape[:-2]) if self._token_mask is True else self._token_mask).to(z.device, torch.bool)
        if mask.shape != z.shape[:-2]:
            raise ValueError(f"token_mask has shape {tuple(mask.shape)}, the tokens {tuple(z.shape[:-2])}")
        z, pi = z[mask].float(), pi[mask].float()  # the counted tokens only
        self.task_importance_sum += einsum(pi, z.square(), "n e, n e r -> e r")  # (n, e), (n, e, r) -> (e, r)
        self.task_tokens += mask.sum()

    def task_importance(self) -> torch.Tensor:  # I(t) of Eq. 9, (e, r): the mean over this task's counted tokens
        if self.task_tokens.item() == 0:
            raise RuntimeError("no tokens were counted: run forwards in track_importance() before end_task")
        return self.task_importance_sum / self.task_tokens

    def stab_weights(self) -> torch.Tensor:
        """w (e, r) of section 4.3; 0 before the first task ends (nothing to hold yet)."""
        return (self.importance_agg / self.importance_agg.mean().clamp_min(1e-30)).clamp(0, self.cfg.weight_clip)

    # The layer reads like the Linear it wraps, for code that inspects its modules.
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the statistics and (under adapter_dtype) the adapters, their
        # gradients and the anchors, which Eq. 11 compares: those follow the device and keep their dtype.
        own = [t for name, t in [*self.named_parameters(), *self.named_buffers()] if not name.startswith("base.")]
        own = own if self.cfg.adapter_dtype else [self.task_importance_sum, self.importance_agg]
        kept = {id(t) for t in own + [t.grad for t in own if t.grad is not None]}

        def move(t):
            out = fn(t)
            return t.to(out.device) if id(t) in kept and out.dtype != t.dtype else out

        return super()._apply(move, recurse)


@contextlib.contextmanager
def track_importance(model: nn.Module, token_mask: torch.Tensor | None = None):
    """Count tokens for Eq. 9 in no-grad forwards: token_mask (..., n) is the attention mask, None counts all."""
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
    """I_agg += I(t) (Eq. 10); anchors <- A, B; counters reset. Under torch.distributed the sums are all-reduced."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for layer in pas_layers(model).values():
        for stat in (layer.task_importance_sum, layer.task_tokens) if distributed else ():
            torch.distributed.all_reduce(stat)
        layer.importance_agg += layer.task_importance()
        if layer.cfg.stabilize:
            layer.anchor_A.copy_(layer.lora_A), layer.anchor_B.copy_(layer.lora_B)
        layer.task_importance_sum.zero_(), layer.task_tokens.zero_()


def stabilization_loss(model: nn.Module) -> torch.Tensor:
    """Eq. 11's penalty, sum over the PASs layers: lambda_A * (A-row drift) + lambda_B * (B-column drift)."""
    total = torch.zeros(())
    for layer in pas_layers(model).values():
        if not layer.cfg.stabilize or not layer.importance_agg.any():  # w = 0 until a task has ended
            continue
        w = layer.stab_weights()  # (e, r)
        # ||a_ek - a*_ek||^2 over the rows of A, ||b_ek - b*_ek||^2 over the columns of B: (e, r) each
        a = reduce((layer.lora_A.float() - layer.anchor_A.float()).square(), "e r d -> e r", "sum")
        b = reduce((layer.lora_B.float() - layer.anchor_B.float()).square(), "e o r -> e r", "sum")
        total = total + layer.cfg.lambda_a * (w * a).sum() + layer.cfg.lambda_b * (w * b).sum()
    return total


def pas_layers(model: nn.Module) -> dict[str, PASsMoELinear]:
    """Every PASs layer of a model (subclasses too), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PASsMoELinear)}


def inject(model, cfg, target=LLAMA_LINEARS, freeze_others=True, keep_trainable=None, layer_class=PASsMoELinear):
    """Replace each nn.Linear whose name matches `target` (re.search) by a `layer_class` layer; returns the
    names. freeze_others: only the adapters train (as PEFT), and modules matching `keep_trainable` (a task
    head: PEFT's modules_to_save); else only the wrapped bases freeze."""
    if pas_layers(model):
        raise RuntimeError("this model already holds PASs layers; inject into a fresh model")
    by_module: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if re.search(target, name) and isinstance(module, nn.Linear):
            by_module.setdefault(id(module), []).append(name)
        elif re.search(target, name) and module._parameters:  # weights of its own that it cannot wrap: GPT-2's Conv1D
            raise ValueError(f"{name} matches but is a {type(module).__name__}: make it an nn.Linear (see README)")
    if not by_module:
        raise ValueError(f"no nn.Linear in the model matches target={target!r}")
    for names in by_module.values():
        if isinstance(model.get_submodule(names[0].rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"{names[0]}: nn.MultiheadAttention reads out_proj.weight, never calls it; narrow target")
        if len(names) > 1:
            warnings.warn(f"one nn.Linear is shared under the names {names}: it gets one PASs layer", stacklevel=2)
    for name, param in model.named_parameters() if freeze_others else ():
        param.requires_grad_(bool(keep_trainable and re.search(keep_trainable, name.rpartition(".")[0])))
    for index, names in enumerate(by_module.values()):
        layer = layer_class(model.get_submodule(names[0]), cfg, index=index)
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return [name for names in by_module.values() for name in names]
