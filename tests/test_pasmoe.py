"""pasmoe.py (and pasmoe_fused.py, what training uses, and the baselines' layer variants) against an
independent float64 loop over tokens and experts written here."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import pasmoe_fused
from baselines import ChosenExperts, PermutedWeights, RoutedMoELinear, UniformWeights
from pasmoe import PASsConfig, PASsMoELinear, end_task, inject, pas_layers, stabilization_loss, track_importance
from pasmoe_fused import FusedPASsMoELinear

D_IN, D_OUT = 12, 10
LAYERS = {"plain": PASsMoELinear, "fused": FusedPASsMoELinear}


def make_layer(kind="plain", E=3, r=4, seed=0, top_k=None, **kw):
    """A layer of the given kind with nonzero B and spread energies, so every term of the output counts."""
    torch.manual_seed(seed)
    cfg = PASsConfig(num_experts=E, rank=r, alpha=2.0 * r + 3, **kw)
    if kind == "router":
        layer = RoutedMoELinear(nn.Linear(D_IN, D_OUT), cfg, top_k=top_k)
    else:
        layer = LAYERS[kind](nn.Linear(D_IN, D_OUT), cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.mul_(3.0)  # spread the energies so the gate is far from uniform
    return layer


# ---- the reference: plain float64, one token and one expert at a time ----


def reference(cfg, x, A, B, W, bias, Wg=None, top_k=None):
    """Eq. 3, 6, 7 by loops, as the paper writes them. Everything comes from the config and the inputs,
    never from the layer under test (a layer that scaled by alpha instead of alpha / r passed checks
    while the scaling was read from it). Wg: a learned router's weight instead of the energy gate."""
    outs, gates = [], []
    for h in x.reshape(-1, x.shape[-1]):
        if Wg is None:
            logits = [torch.dot(A[e] @ h, A[e] @ h) / cfg.rank for e in range(cfg.num_experts)]
        else:
            logits = [torch.dot(Wg[e], h) for e in range(cfg.num_experts)]
        logits = torch.stack(logits) / cfg.temperature
        if top_k is not None:
            kept = set(sorted(range(cfg.num_experts), key=lambda e: -logits[e].item())[:top_k])
            logits = torch.stack([logits[e] if e in kept else logits[e] * 0 - torch.inf for e in range(len(logits))])
        ex = torch.exp(logits - logits.max())
        pi = list(ex / ex.sum())
        y = W @ h + bias
        for e in range(cfg.num_experts):
            y = y + cfg.alpha / cfg.rank * pi[e] * (B[e] @ (A[e] @ h))
        outs.append(y)
        gates.append(torch.stack(pi))
    return torch.stack(outs).reshape(*x.shape[:-1], -1), torch.stack(gates).reshape(*x.shape[:-1], -1)


def close(a, b, tol=1e-5):
    err = (a.double() - b).norm() / b.norm().clamp_min(1e-12)
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("kind,top_k", [("plain", None), ("fused", None), ("router", None), ("router", 2)])
def test_forward_gate_and_gradients_match_float64_loop(kind, top_k):
    # planted bugs: the energy without its 1/r, tau left out, the mixture over the wrong axis, the scaling
    # alpha instead of alpha / r, a hand-written backward without its softmax term (fused)
    layer = make_layer(kind, E=4, top_k=top_k, temperature=1.7 if kind != "router" else 1.0)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    y = layer(x)
    g_out = torch.randn_like(y)
    y.backward(g_out)
    x64 = x.detach().double().requires_grad_()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    Wg = layer.router.weight.detach().double().requires_grad_() if kind == "router" else None
    W, bias = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    y_ref, pi_ref = reference(layer.cfg, x64, A, B, W, bias, Wg, top_k)
    y_ref.backward(g_out.double())
    close(y, y_ref)
    pi = layer.gate(x.detach())
    close(pi, pi_ref)
    assert torch.allclose(pi.sum(-1), torch.ones(2, 5))
    close(x.grad, x64.grad)
    close(layer.lora_A.grad, A.grad)
    close(layer.lora_B.grad, B.grad)
    if Wg is not None:
        close(layer.router.weight.grad, Wg.grad)
    if top_k is not None:
        assert ((pi > 0).sum(-1) == top_k).all()
    assert layer.base.weight.grad is None  # frozen


def test_fused_layer_equals_the_plain_one_and_keeps_less():
    # planted bugs: a fused backward that drops a term (gradients differ), or one that keeps z * pi
    # or an fp32 copy of z (it would keep as much as plain autograd)
    from lab.bench import saved_bytes

    plain, fused = make_layer("plain", E=4), make_layer("fused", E=4)
    x = torch.randn(3, 7, D_IN, requires_grad=True)
    for layer in (plain, fused):
        layer(x).square().sum().backward()
    close(fused(x.detach()), plain(x.detach()).double().detach())
    close(fused.lora_A.grad, plain.lora_A.grad.double())
    close(fused.lora_B.grad, plain.lora_B.grad.double())
    assert saved_bytes(fused, x) < 0.6 * saved_bytes(plain, x)


def test_equals_base_at_init():
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT)
    layer = PASsMoELinear(copy.deepcopy(base), PASsConfig(num_experts=4, rank=3))
    x = torch.randn(7, D_IN)
    assert torch.equal(layer(x), base(x))


def test_one_expert_is_a_plain_lora():
    # planted bug: a gate that is not 1 with one expert (softmax over the wrong axis)
    layer = make_layer("plain", E=1, r=5)
    x = torch.randn(6, D_IN)
    plain = layer.base(x) + (x @ layer.lora_A[0].T @ layer.lora_B[0].T) * layer.scaling
    assert torch.allclose(layer(x), plain, atol=1e-5)


def test_the_gates_gradient_reaches_A():
    # with B = 0 the output gives A no gradient; the gate's dependence on the energy must
    layer = make_layer("plain")
    x = torch.randn(4, D_IN)
    layer.gate(x)[:, 0].sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0


def test_chosen_experts_take_the_mixture_given():
    # planted bug: the chosen weights ignored (the energy gate used instead)
    layer = ChosenExperts(nn.Linear(D_IN, D_OUT), PASsConfig(num_experts=3, rank=2))
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.chosen = torch.tensor([0.0, 1.0, 0.0])
    x = torch.randn(5, D_IN)
    only_one = layer.base(x) + layer.scaling * (x @ layer.lora_A[1].T) @ layer.lora_B[1].T
    assert torch.allclose(layer(x), only_one, atol=1e-5)


# ---- importance (Eq. 9, 10) ----


def importance_reference(layer, x, mask):
    """Sum over unmasked tokens of pi_e * z_ek^2 and their count, one token and expert at a time, float64."""
    A = layer.lora_A.detach().double()
    _, pi = reference(
        layer.cfg,
        x.double(),
        A,
        layer.lora_B.detach().double(),
        layer.base.weight.detach().double(),
        layer.base.bias.detach().double(),
    )
    total, count = torch.zeros(A.shape[:2], dtype=torch.float64), 0
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            if mask[b, n]:
                for e in range(A.shape[0]):
                    total[e] += pi[b, n, e] * (A[e] @ x[b, n].double()) ** 2
                count += 1
    return total, count


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_importance_matches_definition_and_excludes_padding(kind):
    # planted bugs: padding counted, pi left out of Eq. 9, a sum where the mean is meant
    layer = make_layer(kind)
    x1, x2 = torch.randn(3, 6, D_IN), torch.randn(2, 4, D_IN)
    m1 = torch.rand(3, 6) > 0.4
    m2 = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        with track_importance(layer, token_mask=m1):
            layer(x1)
        with track_importance(layer, token_mask=m2):  # accumulates across calls
            layer(x2)
    t1, c1 = importance_reference(layer, x1, m1)
    t2, c2 = importance_reference(layer, x2, m2)
    assert layer.task_tokens.item() == c1 + c2
    assert torch.allclose(layer.task_importance().double(), (t1 + t2) / (c1 + c2), rtol=1e-5)
    x_pad = x1.clone()
    x_pad[~m1] = float("inf")  # padding rows with garbage change nothing
    fresh = make_layer(kind)
    with torch.no_grad(), track_importance(fresh, token_mask=m1):
        fresh(x_pad)
    assert torch.allclose(fresh.task_importance().double(), t1 / c1, rtol=1e-5)


def test_nothing_accumulates_outside_tracking():
    layer = make_layer("plain")
    with torch.no_grad():
        layer(torch.randn(3, D_IN))
    assert layer.task_tokens.item() == 0 and layer.task_importance_sum.abs().sum() == 0
    with pytest.raises(RuntimeError, match="no tokens were counted"):
        layer.task_importance()


def test_mask_shape_mismatch_is_a_clear_error():
    layer = make_layer("plain")
    with pytest.raises(ValueError, match="token_mask has shape"):
        with torch.no_grad(), track_importance(layer, token_mask=torch.ones(2, 3, dtype=torch.bool)):
            layer(torch.randn(2, 4, D_IN))


def test_importance_is_counted_in_no_grad_passes_only():
    # Under gradient checkpointing a forward runs again inside backward; counting there would count its
    # tokens twice. So tracking refuses a forward that builds a graph, and a checkpointed model counts
    # each token once in a no-grad statistics pass (planted bug: the refusal removed, and the replay counted).
    layer = make_layer("fused")
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    with track_importance(layer), pytest.raises(RuntimeError, match="no-grad"):
        checkpoint(layer, x, use_reentrant=False).sum().backward()
    layer.task_importance_sum.zero_(), layer.task_tokens.zero_()
    with torch.no_grad(), track_importance(layer):
        checkpoint(layer, x, use_reentrant=False)
    assert layer.task_tokens.item() == 10


def test_end_task_sums_task_means_and_snapshots_anchors():
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.ReLU(), nn.Linear(D_IN, D_OUT))
    torch.manual_seed(3)
    inject(model, PASsConfig(num_experts=2, rank=3), target=r"^(0|2)$")
    layer = model[0]
    means = []
    for _ in range(2):
        with torch.no_grad(), track_importance(model):
            model(torch.randn(4, D_IN))
        means.append(layer.task_importance().clone())
        with torch.no_grad():
            layer.lora_A.add_(0.1)
        end_task(model)
        assert torch.equal(layer.anchor_A, layer.lora_A) and torch.equal(layer.anchor_B, layer.lora_B)
        assert layer.task_tokens.item() == 0
    assert torch.allclose(layer.importance_agg, means[0] + means[1])


def test_without_eq11_a_layer_keeps_no_anchors():
    # planted bug: anchors kept by layers that never read them (7 GiB at LLaVA-7B for MoELoRA or PASs-RW)
    layer = PASsMoELinear(nn.Linear(4, 4), PASsConfig(num_experts=2, rank=2, stabilize=False))
    assert not any(name.startswith("anchor") for name in layer.state_dict())
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(3, 4))
    end_task(layer)
    assert stabilization_loss(layer).item() == 0


# ---- stabilization (Eq. 11) ----


def stab_reference(layers, weights):
    """Eq. 11 with the given weights w (e, r) per layer, by loops over experts and ranks, float64."""
    total = 0.0
    for layer, w in zip(layers, weights):
        for e in range(w.shape[0]):
            for k in range(w.shape[1]):
                a = ((layer.lora_A[e, k].double() - layer.anchor_A[e, k].double()) ** 2).sum()
                b = ((layer.lora_B[e, :, k].double() - layer.anchor_B[e, :, k].double()) ** 2).sum()
                total = total + w[e, k] * (layer.cfg.lambda_a * a + layer.cfg.lambda_b * b)
    return total


def skewed_importance_and_drift(model):
    for layer in pas_layers(model).values():
        with torch.no_grad():
            layer.importance_agg.copy_(torch.rand(3, 4) ** 4)  # skewed, so the clip bites
            layer.importance_agg[0, 0] = 50.0
            layer.lora_A.add_(torch.randn_like(layer.lora_A))
            layer.lora_B.add_(torch.randn_like(layer.lora_B))
    return list(pas_layers(model).values())


@pytest.mark.parametrize("loss_of", [stabilization_loss, pasmoe_fused.stabilization_loss])
def test_stab_weights_and_loss_match_formulas(loss_of):
    # planted bugs: w without its clip or its per-layer mean, A's drift summed over the wrong axis (columns
    # instead of rows), lambda_a and lambda_b swapped, a fused backward without its factor 2
    cfg = PASsConfig(num_experts=3, rank=4, weight_clip=2.5, lambda_a=0.3, lambda_b=0.7)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT))
    inject(model, cfg, target=r"^\d$")
    assert loss_of(model).item() == 0  # before any task
    layers = skewed_importance_and_drift(model)
    agg = layers[0].importance_agg
    w = layers[0].stab_weights()
    assert w.max() == 2.5 and torch.allclose(w, (agg / agg.mean()).clamp(0, 2.5))
    loss = loss_of(model)
    expected = stab_reference(layers, [layer.stab_weights().double() for layer in layers])
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    l0 = layers[0]
    assert torch.allclose(l0.lora_A.grad, 2 * 0.3 * w.unsqueeze(-1) * (l0.lora_A - l0.anchor_A), atol=1e-6)
    assert torch.allclose(l0.lora_B.grad, 2 * 0.7 * w.unsqueeze(1) * (l0.lora_B - l0.anchor_B), atol=1e-6)


def test_loss_and_gradient_zero_at_anchor():
    layer = make_layer("fused")
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    loss = pasmoe_fused.stabilization_loss(layer)
    assert loss.item() == 0
    loss.backward()
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0


def test_permuted_weights_are_a_permutation_of_the_importance_weights():
    # planted bugs: a permutation that is the identity, or one that changes with every call
    torch.manual_seed(0)
    pas = PASsMoELinear(nn.Linear(D_IN, D_OUT), PASsConfig(num_experts=4, rank=5))
    rnd = PermutedWeights(nn.Linear(D_IN, D_OUT), PASsConfig(num_experts=4, rank=5), seed=0)
    agg = torch.rand(4, 5)
    pas.importance_agg.copy_(agg)
    rnd.importance_agg.copy_(agg)
    w_pas, w_rnd = pas.stab_weights(), rnd.stab_weights()
    assert torch.equal(w_pas.flatten().sort().values, w_rnd.flatten().sort().values)
    assert not torch.equal(w_pas, w_rnd) and torch.equal(rnd.stab_weights(), w_rnd)


def test_random_permutation_depends_on_seed_and_layer_index():
    # planted bug: one permutation for every layer or seed (then "random" targets the same slots everywhere)
    def weights(seed, index):
        layer = PermutedWeights(nn.Linear(4, 4), PASsConfig(num_experts=3, rank=4), index, seed=seed)
        layer.importance_agg.copy_(torch.arange(12.0).view(3, 4) + 1)
        return layer.stab_weights()

    assert torch.equal(weights(0, 0), weights(0, 0))
    assert not torch.equal(weights(0, 0), weights(1, 0)) and not torch.equal(weights(0, 0), weights(0, 1))


def test_uniform_weights_are_zero_before_the_first_task_and_ones_after():
    # planted bugs: uniform weights that are 1 before any anchor exists (pulls toward the random init),
    # or that still follow the importance values
    layer = UniformWeights(nn.Linear(D_IN, D_OUT), PASsConfig(num_experts=3, rank=4))
    assert torch.equal(layer.stab_weights(), torch.zeros(3, 4))
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    assert layer.importance_agg.std() > 0 and torch.equal(layer.stab_weights(), torch.ones(3, 4))


def test_state_dict_round_trips_continual_state():
    layer = make_layer("router")
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    fresh = make_layer("router", seed=11)
    fresh.load_state_dict(layer.state_dict())
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert layer.state_dict()["importance_agg"].abs().sum() > 0


# ---- dtypes and shapes ----


@pytest.mark.parametrize("kind", ["plain", "fused"])
@pytest.mark.parametrize("adapter_dtype", ["float32", None])
def test_bf16_runs_with_fp32_gate(kind, adapter_dtype):
    layer = make_layer(kind, adapter_dtype=adapter_dtype).to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == (torch.float32 if adapter_dtype else torch.bfloat16)
    x = torch.randn(3, 4, D_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = make_layer(kind)(x.float())
    assert (y.float() - ref).norm() / ref.norm() < 3e-2
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_A.dtype and torch.isfinite(layer.lora_A.grad.float()).all()


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_energy_is_fp32_under_bf16(kind):
    # planted bug: the energy s_e = ||z_e||^2 / r computed in bf16 (8 bits of mantissa), which moves the
    # gate by ~1e-2; in fp32 it matches a float64 energy of the same bf16 z to 1e-6
    layer = make_layer(kind, adapter_dtype=None).to(torch.bfloat16)
    x = torch.randn(64, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        z = layer.responses(x)  # bf16, as the forward sees it
        pi = layer.gate(x, z)
    assert pi.dtype == torch.float32
    assert (pi.double() - torch.softmax(z.double().square().mean(-1), dim=-1)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs", [dict(num_experts=0), dict(rank=0), dict(alpha=0.0), dict(temperature=0.0), dict(weight_clip=-1.0)]
)
def test_bad_config_fails_clearly(kwargs):
    with pytest.raises(ValueError, match="must be > 0"):
        PASsConfig(**kwargs)


def test_bad_base_fails_clearly():
    with pytest.raises(TypeError, match="nn.Linear"):
        PASsMoELinear(nn.Conv1d(2, 2, 1), PASsConfig())


def test_inject_matches_pattern_and_refuses_twice():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4), "other": nn.Linear(4, 4)})
    names = inject(model, PASsConfig(num_experts=2, rank=2))
    assert sorted(names) == ["k_proj", "q_proj"] and isinstance(model["other"], nn.Linear)
    with pytest.raises(RuntimeError, match="already"):
        inject(model, PASsConfig())
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(nn.Sequential(nn.Linear(2, 2)), PASsConfig(), target="nothing")


def test_fused_functions_pass_gradcheck():
    # planted bugs: the softmax's backward without its mean term, tau left out of it, ds/dz without its
    # factor 2 / r, the scaling applied twice in MixLowRank's backward, Eq. 11's backward without its 2
    from pasmoe_fused import EnergyGate, MixLowRank, WeightedDrift

    z = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1).requires_grad_()
    B = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, pi, B: MixLowRank.apply(z, pi, B, 1.7), (z, pi, B))
    assert torch.autograd.gradcheck(lambda z: EnergyGate.apply(z, 1.7), (z,))
    w = torch.rand(3, 4, dtype=torch.float64)
    A, A0 = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 5, dtype=torch.float64)
    B0 = torch.randn(3, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: WeightedDrift.apply(a, A0, b, B0, w), (A, B))


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_reads_inputs_as_a_linear_does_float64_and_unbatched_too(kind):
    # planted bugs: importance counted with pi in another dtype than z (einsum fails under float64), an
    # unbatched (d,) input refused although nn.Linear takes it
    layer = make_layer(kind).double()
    x = torch.randn(D_IN, dtype=torch.float64)
    with torch.no_grad(), track_importance(layer):
        y = layer(x)
    assert y.shape == (D_OUT,) and layer.task_tokens.item() == 1
    assert torch.allclose(y, layer(x.unsqueeze(0))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_keeps_what_a_lora_of_the_same_total_rank_keeps(dtype):
    """Deterministic memory check (timings live in lab/bench.py): the fused layer keeps z and pi only."""
    # planted bug: autograd-written gate and mixing in the fused layer (keeps z * pi and fp32 z: ~2.5x)
    from lab.bench import PlainLoRA, saved_bytes

    n, d, E, r = 64, 32, 4, 8
    base = nn.Linear(d, d).to(dtype)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    same_dtype = PASsConfig(num_experts=E, rank=r, adapter_dtype=None)  # like the LoRA it is compared with
    fused = saved_bytes(FusedPASsMoELinear(base, same_dtype), x)
    lora = saved_bytes(PlainLoRA(base, E * r), x)
    size = torch.finfo(dtype).bits // 8
    assert lora == n * E * r * size  # z
    assert fused == n * E * r * size + n * E * 4  # z, and pi in fp32


@pytest.mark.parametrize("kind", ["plain", "fused"])
def test_dropout_acts_on_the_adapter_input_only(kind):
    # planted bugs: dropout also on the base's input, or never applied in training
    layer = make_layer(kind, dropout=0.5, adapter_dtype=None).double()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask
    A, B, W, bias = layer.lora_A.detach(), layer.lora_B.detach(), layer.base.weight.double(), layer.base.bias.double()
    ref, _ = reference(layer.cfg, xd, A, B, W, bias)
    base_shift = (layer.base(x) - layer.base(xd)).detach()  # the base sees the undropped x
    assert torch.allclose(y, ref + base_shift, rtol=1e-10, atol=1e-10)
    layer.eval()
    assert torch.allclose(layer(x), reference(layer.cfg, x, A, B, W, bias)[0], rtol=1e-10, atol=1e-10)


# ---- the mixture's scale (config.RunConfig.mixture_scale) ----


def _pair(scale: str):
    """A mixture (E = 4 experts of rank 3) under one of the conventions, with a uniform gate, beside the
    reference LoRA of rank 12, both as config.adapters builds them for the run's flags, on one base."""
    import config

    flags = ["--num-experts", "4", "--rank", "3", "--alpha", "6"]
    mixture, _ = config.adapters(config.parse_args(["--method", "pas-rw", "--mixture-scale", scale, *flags])[0])
    single, _ = config.adapters(config.parse_args(["--method", "seqlora", *flags])[0])
    base = nn.Linear(D_IN, D_OUT)
    torch.manual_seed(5)
    moe = ChosenExperts(base, mixture)
    moe.chosen = torch.full((4,), 0.25)
    torch.manual_seed(5)
    lora = PASsMoELinear(base, single)
    with torch.no_grad():
        lora.lora_B.normal_()
        moe.lora_B.copy_(lora.lora_B[0].unflatten(1, (4, 3)).permute(1, 0, 2))  # B_e: columns e r .. e r + r of B
    return moe, lora


def test_scale_matched_experts_at_a_uniform_gate_are_the_reference_lora():
    # planted bug: the matched convention's alpha not multiplied by E (then the experts learn at 1/E of the
    # reference's scale, the study's old regime); an init that differs from the reference LoRA's
    moe, lora = _pair("matched")
    assert torch.equal(moe.lora_A.flatten(0, 1), lora.lora_A[0])  # the same init, bit for bit
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    out_moe, out_lora = moe(x), lora(x)
    assert torch.allclose(out_moe, out_lora, atol=1e-5)
    out_moe.square().sum().backward()
    out_lora.square().sum().backward()
    assert torch.allclose(moe.lora_A.grad.flatten(0, 1), lora.lora_A.grad[0], atol=1e-5)
    assert torch.allclose(moe.lora_B.grad.permute(1, 0, 2).flatten(1), lora.lora_B.grad[0], atol=1e-5)


def test_at_the_papers_scale_a_uniform_mixture_is_the_reference_lora_divided_by_e():
    # planted bug: the paper's convention scaled like the matched one (the two regimes then one)
    moe, lora = _pair("paper")
    x = torch.randn(3, D_IN)
    assert torch.allclose(moe(x) - moe.base(x), (lora(x) - lora.base(x)) / 4, atol=1e-5)


def test_gpt2_takes_the_layer_once_its_conv1d_are_linears_as_the_readme_says():
    # planted bugs: inject silently skipping Conv1D (it must name them), the README's conversion giving
    # another output (a weight not transposed)
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).logits
    target = r"(c_attn|c_proj|c_fc)$"
    with pytest.raises(ValueError, match=r"c_attn matches but is a Conv1D"):
        inject(model, PASsConfig(num_experts=2, rank=2), target=target)
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):  # the README's recipe
            lin = nn.Linear(*m.weight.shape)
            lin.weight.data = m.weight.T.contiguous()
            lin.bias.data = m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    assert len(inject(model, PASsConfig(num_experts=2, rank=2), target=target)) == 8  # 4 per block
    assert torch.allclose(model(ids).logits, before, atol=1e-5)  # B = 0: still the same model
