"""pasmoe.py's layer and Eq. 11 with hand-written backward passes: the same numbers, less memory.

What training uses. Plain autograd (pasmoe.py) keeps for backward, besides z: an fp32 copy of z when
the model runs in bf16 (for the energy), the gated z * pi (for B's gradient) and, in Eq. 11, an fp32
copy of every adapter's drift A - A*. The Functions below keep only tensors that live anyway (z, pi,
the parameters, the anchors) and recompute the rest, so a layer stores what a LoRA of rank E * r stores.
tests/test_pasmoe.py checks them against pasmoe.py (outputs, gradients, saved bytes) and gradcheck;
lab/bench.py times both against a plain LoRA.
"""

from __future__ import annotations

import torch

from pasmoe import PASsMoELinear, pas_layers


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class EnergyGate(torch.autograd.Function):
    """pi = softmax(||z_e||^2 / r / tau) (Eq. 6-7): z (n, e, r) -> pi (n, e), fp32; keeps z and pi."""

    @staticmethod
    def forward(ctx, z, tau):
        pi = torch.softmax(_fp32(z).square().mean(dim=-1) / tau, dim=-1)
        ctx.save_for_backward(z, pi)
        ctx.tau = tau
        return pi

    @staticmethod
    def backward(ctx, grad_pi):
        z, pi = ctx.saved_tensors
        grad_s = pi * (grad_pi - (grad_pi * pi).sum(dim=-1, keepdim=True)) / ctx.tau  # through the softmax
        return (_fp32(z) * (grad_s * 2 / z.shape[-1]).unsqueeze(-1)).to(z.dtype), None  # ds_e/dz_e = 2 z_e / r


class MixLowRank(torch.autograd.Function):
    """scaling * sum_e pi_e B_e z_e (Eq. 3): z (n, e, r), pi (n, e), B (e, o, r) -> (n, o); keeps z, pi, B."""

    @staticmethod
    def mix(z, pi, lora_B, scaling):  # (n, e r) @ (e r, o)
        gated = (z * (pi * scaling).to(z.dtype).unsqueeze(-1)).flatten(1)
        return gated @ lora_B.to(z.dtype).transpose(1, 2).flatten(0, 1)

    @staticmethod
    def forward(ctx, z, pi, lora_B, scaling):
        ctx.save_for_backward(z, pi, lora_B)
        ctx.scaling = scaling
        return MixLowRank.mix(z, pi, lora_B, scaling)

    @staticmethod
    def backward(ctx, grad):
        z, pi, lora_B = ctx.saved_tensors
        grad = grad.to(z.dtype) * ctx.scaling
        grad_gated = (grad @ lora_B.to(z.dtype).transpose(0, 1).flatten(1)).view_as(z)  # (n, o) @ (o, e r)
        grad_pi = (_fp32(grad_gated) * _fp32(z)).sum(dim=-1)
        gated = (z * pi.to(z.dtype).unsqueeze(-1)).flatten(1)  # recomputed, not stored
        grad_B = (grad.T @ gated).unflatten(1, z.shape[1:]).transpose(0, 1)  # (o, e r) -> (e, o, r)
        return grad_gated * pi.to(z.dtype).unsqueeze(-1), grad_pi.to(pi.dtype), grad_B.to(lora_B.dtype), None


class WeightedDrift(torch.autograd.Function):
    """(sum_ek w_ek ||A[e,k,:] - A*[e,k,:]||^2, sum_ek w_ek ||B[e,:,k] - B*[e,:,k]||^2), fp32; the drift is
    recomputed in backward instead of kept (at LLaVA-7B, E = 6, r = 128, it would be 7 GiB)."""

    @staticmethod
    def forward(ctx, A, anchor_A, B, anchor_B, w):
        ctx.save_for_backward(A, anchor_A, B, anchor_B, w)
        a = (w * (_fp32(A) - _fp32(anchor_A)).square().sum(dim=2)).sum()  # A: (e, r, d)
        b = (w * (_fp32(B) - _fp32(anchor_B)).square().sum(dim=1)).sum()  # B: (e, o, r)
        return torch.stack([a, b])

    @staticmethod
    def backward(ctx, grad):
        A, anchor_A, B, anchor_B, w = ctx.saved_tensors
        grad_A = (_fp32(A) - _fp32(anchor_A)) * (2 * grad[0] * w).unsqueeze(2)
        grad_B = (_fp32(B) - _fp32(anchor_B)) * (2 * grad[1] * w).unsqueeze(1)
        return grad_A.to(A.dtype), None, grad_B.to(B.dtype), None, None


class FusedPASsMoELinear(PASsMoELinear):
    """PASsMoELinear computed by the Functions above. Subclasses may still override `gate` (routers)."""

    def gate(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return EnergyGate.apply(self.responses(x) if z is None else z, self.cfg.temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.responses(x)
        pi = self.gate(x, z)
        if self._token_mask is not None:
            self._count(z, pi)
        delta = MixLowRank.apply(z.reshape(-1, *z.shape[-2:]), pi.reshape(-1, pi.shape[-1]), self.lora_B, self.scaling)
        return self.base(x) + delta.reshape(*x.shape[:-1], -1)


def stabilization_loss(model: torch.nn.Module) -> torch.Tensor:
    """pasmoe.stabilization_loss through WeightedDrift, with one host sync per call, not one per layer."""
    layers = [layer for layer in pas_layers(model).values() if layer.cfg.stabilize]
    ended = torch.stack([layer.importance_agg.any() for layer in layers]).tolist() if layers else []
    total = torch.zeros(())
    for layer in (layer for layer, yes in zip(layers, ended) if yes):  # w = 0 until a task has ended
        drift = WeightedDrift.apply(layer.lora_A, layer.anchor_A, layer.lora_B, layer.anchor_B, layer.stab_weights())
        total = total + layer.cfg.lambda_a * drift[0] + layer.cfg.lambda_b * drift[1]
    return total
