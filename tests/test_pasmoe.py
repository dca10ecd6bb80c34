"""pasmoe.py against an independent float64 per-expert loop written here."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pasmoe import (
    PASsConfig,
    PASsMoELinear,
    end_task,
    inject,
    pas_layers,
    stabilization_loss,
    track_importance,
)

D_IN, D_OUT = 12, 10


def make_layer(gate="pas", E=3, r=4, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = PASsConfig(num_experts=1 if gate == "single" else E, rank=r, alpha=2.0 * r + 3, gate=gate, **kw)
    layer = PASsMoELinear(nn.Linear(D_IN, D_OUT), cfg)
    with torch.no_grad():  # nonzero B, so every term of the output is exercised
        layer.lora_B.normal_()
        layer.lora_A.mul_(3.0)  # spread the energies so the gate is far from uniform
    return layer


# ---- the reference: plain float64, one token and one expert at a time ----


def reference(layer, x, A, B, W, bias, Wg):
    """Loop over tokens and experts exactly as the paper writes Eq. 3, 6, 7. Everything it needs comes
    from the config and the inputs, never from the layer under test (a layer that scaled by alpha
    instead of alpha / r passed the checks while the scaling was read from it)."""
    cfg = layer.cfg
    outs, gates = [], []
    for h in x.reshape(-1, x.shape[-1]):
        if cfg.gate == "single":
            pi = [torch.ones((), dtype=torch.float64)]
        else:
            if cfg.gate == "pas":
                logits = [torch.dot(A[e] @ h, A[e] @ h) / cfg.rank for e in range(cfg.num_experts)]
            else:
                logits = [torch.dot(Wg[e], h) for e in range(cfg.num_experts)]
            logits = torch.stack(logits) / cfg.temperature
            if cfg.gate == "topk":
                order = sorted(range(cfg.num_experts), key=lambda e: -logits[e].item())
                kept = set(order[: cfg.top_k])
                logits = torch.stack([logits[e] if e in kept else logits[e] * 0 - torch.inf for e in range(len(logits))])
            ex = torch.exp(logits - logits.max())
            pi = list(ex / ex.sum())
        y = W @ h + bias
        for e in range(cfg.num_experts):
            y = y + cfg.alpha / cfg.rank * pi[e] * (B[e] @ (A[e] @ h))  # from the config, never from the layer
        outs.append(y)
        gates.append(torch.stack(pi))
    return torch.stack(outs).reshape(*x.shape[:-1], -1), torch.stack(gates).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("gate", ["pas", "softmax", "topk", "single"])
def test_forward_gate_and_gradients_match_float64_loop(gate):
    layer = make_layer(gate, temperature=1.7 if gate == "pas" else 1.0)
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    y = layer(x)
    g_out = torch.randn_like(y)
    y.backward(g_out)

    x64 = x.detach().double().requires_grad_()
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    Wg = layer.router.weight.detach().double().requires_grad_() if layer.router is not None else None
    W, bias = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    y_ref, pi_ref = reference(layer, x64, A, B, W, bias, Wg)
    y_ref.backward(g_out.double())

    def close(a, b):
        err = (a.double() - b).norm() / b.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"relative error {err:.2e}"

    close(y, y_ref)
    close(layer.gate(x.detach()), pi_ref)
    assert torch.allclose(layer.gate(x.detach()).sum(-1), torch.ones(2, 5))
    close(x.grad, x64.grad)
    close(layer.lora_A.grad, A.grad)
    close(layer.lora_B.grad, B.grad)
    if Wg is not None:
        close(layer.router.weight.grad, Wg.grad)
    assert layer.base.weight.grad is None  # frozen


def test_equals_base_at_init():
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT)
    layer = PASsMoELinear(copy.deepcopy(base), PASsConfig(num_experts=4, rank=3))
    x = torch.randn(7, D_IN)
    assert torch.equal(layer(x), base(x))


def test_single_equals_plain_lora():
    layer = make_layer("single", r=5)
    x = torch.randn(6, D_IN)
    A, B = layer.lora_A[0], layer.lora_B[0]
    plain = layer.base(x) + (x @ A.T @ B.T) * layer.scaling
    assert torch.allclose(layer(x), plain, atol=1e-5)


def test_topk_keeps_exactly_k():
    layer = make_layer("topk", E=5, top_k=2)
    pi = layer.gate(torch.randn(50, D_IN))
    assert ((pi > 0).sum(-1) == 2).all()


def test_pas_gate_gradient_reaches_A_through_the_gate():
    # With B = 0 the output path gives A no gradient; only the gate's dependence on the
    # energy could, and with B = 0 that path is zero too: so check the gate on its own.
    layer = make_layer("pas")
    x = torch.randn(4, D_IN)
    layer.gate(x)[:, 0].sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0


# ---- importance (Eq. 9, 10) ----


def importance_reference(layer, x, mask):
    """Mean over unmasked tokens of pi_e * z_ek^2, one token and expert at a time, float64."""
    A = layer.lora_A.detach().double()
    _, pi = reference(layer, x.double(), A, layer.lora_B.detach().double(),
                      layer.base.weight.detach().double(), layer.base.bias.detach().double(), None)
    total, count = torch.zeros(A.shape[:2], dtype=torch.float64), 0
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            if mask[b, n]:
                for e in range(A.shape[0]):
                    total[e] += pi[b, n, e] * (A[e] @ x[b, n].double()) ** 2
                count += 1
    return total, count


def test_importance_matches_definition_and_excludes_padding():
    layer = make_layer("pas")
    x1, x2 = torch.randn(3, 6, D_IN), torch.randn(2, 4, D_IN)
    m1 = torch.rand(3, 6) > 0.4
    m2 = torch.ones(2, 4, dtype=torch.bool)
    with track_importance(layer, token_mask=m1):
        layer(x1)
    with track_importance(layer, token_mask=m2):  # accumulates across calls
        layer(x2)
    t1, c1 = importance_reference(layer, x1, m1)
    t2, c2 = importance_reference(layer, x2, m2)
    expected = (t1 + t2) / (c1 + c2)
    assert layer.task_tokens.item() == c1 + c2
    assert torch.allclose(layer.task_importance().double(), expected, rtol=1e-5)
    # padding rows with garbage do not change anything
    x_pad = x1.clone()
    x_pad[~m1] = float("inf")
    fresh = make_layer("pas")
    with track_importance(fresh, token_mask=m1):
        fresh(x_pad)
    assert torch.allclose(fresh.task_importance().double(), t1 / c1, rtol=1e-5)


def test_nothing_accumulates_outside_tracking():
    layer = make_layer("pas")
    layer(torch.randn(3, D_IN))
    assert layer.task_tokens.item() == 0 and layer.task_importance_sum.abs().sum() == 0
    with pytest.raises(RuntimeError, match="no tokens were counted"):
        layer.task_importance()


def test_mask_shape_mismatch_is_a_clear_error():
    layer = make_layer("pas")
    with pytest.raises(ValueError, match="token_mask has shape"):
        with track_importance(layer, token_mask=torch.ones(2, 3, dtype=torch.bool)):
            layer(torch.randn(2, 4, D_IN))


def test_importance_counted_once_under_checkpointing():
    # Guards the private torch API the layer uses to skip replays: if a torch upgrade changes it, either
    # the replay is counted (20 tokens) or the call fails; the hook proves a replay happened.
    layer = make_layer("pas")
    x = torch.randn(2, 5, D_IN, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    calls = []

    def counted(t):
        calls.append(1)
        return layer(t)

    with track_importance(layer, token_mask=mask):
        y = checkpoint(counted, x, use_reentrant=False)
        y.sum().backward()  # replays the forward inside backward
    assert len(calls) == 2, "no checkpoint replay happened: this test checks nothing"
    assert layer.task_tokens.item() == 10
    total, count = importance_reference(layer, x.detach(), mask)
    assert torch.allclose(layer.task_importance().double(), total / count, rtol=1e-5)
    # and the gradient equals the one without checkpointing
    g_ckpt = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    layer(x).sum().backward()
    assert torch.allclose(g_ckpt, layer.lora_A.grad)


def test_end_task_sums_task_means_and_snapshots_anchors():
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.ReLU(), nn.Linear(D_IN, D_OUT))
    torch.manual_seed(3)
    inject(model, PASsConfig(num_experts=2, rank=3), target=r"^(0|2)$")
    layer = model[0]
    means = []
    for t in range(2):
        x = torch.randn(4, D_IN)
        with torch.no_grad(), track_importance(model):
            model(x)
        means.append(layer.task_importance().clone())
        with torch.no_grad():
            layer.lora_A.add_(0.1)
        end_task(model)
        assert torch.equal(layer.anchor_A, layer.lora_A) and torch.equal(layer.anchor_B, layer.lora_B)
        assert layer.task_tokens.item() == 0
    assert torch.allclose(layer.importance_agg, means[0] + means[1])


def stab_reference(layers):
    """Eq. 11 with the weights of section 4.3, by loops over experts and ranks, float64."""
    a = b = 0.0
    for layer in layers:
        agg = layer.importance_agg.double()
        mean = agg.mean()
        for e in range(agg.shape[0]):
            for k in range(agg.shape[1]):
                w = min(max(agg[e, k] / mean, 0.0), layer.cfg.weight_clip)
                a += w * ((layer.lora_A[e, k].double() - layer.anchor_A[e, k].double()) ** 2).sum()
                b += w * ((layer.lora_B[e, :, k].double() - layer.anchor_B[e, :, k].double()) ** 2).sum()
    return a, b


def test_stab_weights_and_loss_match_formulas():
    cfg = PASsConfig(num_experts=3, rank=4, weight_clip=2.5, lambda_a=0.3, lambda_b=0.7)
    model = nn.Sequential(nn.Linear(D_IN, D_IN), nn.Linear(D_IN, D_OUT))
    inject(model, cfg, target=r"^\d$")
    layers = list(pas_layers(model).values())
    assert all(torch.equal(l.stab_weights(), torch.zeros(3, 4)) for l in layers)  # before any task
    for layer in layers:
        with torch.no_grad():
            layer.importance_agg.copy_(torch.rand(3, 4) ** 4)  # skewed, so the clip bites
            layer.importance_agg[0, 0] = 50.0
            layer.lora_A.add_(torch.randn_like(layer.lora_A))
            layer.lora_B.add_(torch.randn_like(layer.lora_B))
    w = layers[0].stab_weights()
    agg = layers[0].importance_agg
    assert w.max() == 2.5 and torch.allclose(w, (agg / agg.mean()).clamp(0, 2.5))
    loss = stabilization_loss(model)
    a, b = stab_reference(layers)
    assert torch.allclose(loss.a.double(), a, rtol=1e-5) and torch.allclose(loss.b.double(), b, rtol=1e-5)
    assert torch.allclose(loss.total.double(), 0.3 * a + 0.7 * b, rtol=1e-5)
    # gradient of the A part: 2 * lambda_a * w_ek * (a_ek - a*_ek)
    loss.total.backward()
    l0 = layers[0]
    expected = 2 * 0.3 * w.unsqueeze(-1) * (l0.lora_A - l0.anchor_A)
    assert torch.allclose(l0.lora_A.grad, expected, atol=1e-6)


def test_loss_and_gradient_zero_at_anchor():
    layer = make_layer("pas")
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    loss = stabilization_loss(layer)
    assert loss.total.item() == 0
    loss.total.backward()
    assert layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() == 0


def test_random_reg_is_a_permutation_of_pas():
    pas, rnd = make_layer("pas", E=4, r=5), make_layer("pas", E=4, r=5, reg="random", seed=0)
    agg = torch.rand(4, 5)
    pas.importance_agg.copy_(agg)
    rnd.importance_agg.copy_(agg)
    w_pas, w_rnd = pas.stab_weights(), rnd.stab_weights()
    assert torch.equal(w_pas.flatten().sort().values, w_rnd.flatten().sort().values)
    assert not torch.equal(w_pas, w_rnd)
    assert torch.equal(make_layer("pas", E=4, r=5, reg="random", seed=9).perm, rnd.perm)  # seeded


def test_uniform_reg_is_zero_before_the_first_task_and_ones_after():
    # planted bugs: uniform weights that are 1 before any anchor exists (pulls toward the
    # random init), or that still follow the importance values
    layer = make_layer("pas", E=3, r=4, reg="uniform")
    assert torch.equal(layer.stab_weights(), torch.zeros(3, 4))
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    assert layer.importance_agg.std() > 0  # the importance values differ; the weights do not
    assert torch.equal(layer.stab_weights(), torch.ones(3, 4))
    with torch.no_grad():
        layer.lora_A.add_(torch.randn_like(layer.lora_A))
    a = ((layer.lora_A.double() - layer.anchor_A.double()) ** 2).sum()  # w = 1: plain L2 to the anchor
    assert torch.allclose(stabilization_loss(layer).a.double(), a, rtol=1e-5)


def test_state_dict_round_trips_continual_state():
    layer = make_layer("softmax")
    with torch.no_grad(), track_importance(layer):
        layer(torch.randn(5, D_IN))
    end_task(layer)
    fresh = make_layer("softmax", seed=11)
    fresh.load_state_dict(layer.state_dict())
    state, restored = layer.state_dict(), fresh.state_dict()
    for key in ("importance_agg", "anchor_A", "anchor_B", "lora_A", "lora_B", "router.weight"):
        assert torch.equal(restored[key], state[key]), key
    assert state["importance_agg"].abs().sum() > 0


@pytest.mark.parametrize("adapter_dtype", ["float32", None])
def test_bf16_runs_with_fp32_gate(adapter_dtype):
    layer = make_layer("pas", adapter_dtype=adapter_dtype).to(torch.bfloat16)
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == (torch.float32 if adapter_dtype else torch.bfloat16)
    x = torch.randn(3, 4, D_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = make_layer("pas")(x.float())
    assert (y.float() - ref).norm() / ref.norm() < 3e-2
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_A.dtype
    assert torch.isfinite(layer.lora_A.grad.float()).all()


def test_energy_is_fp32_under_bf16():
    # planted bug: the energy s_e = ||z_e||^2 / r computed in bf16 (8 bits of mantissa), which
    # moves the gate by ~1e-2; in fp32 it matches a float64 energy of the same bf16 z to 1e-6
    layer = make_layer("pas", adapter_dtype=None).to(torch.bfloat16)
    x = torch.randn(64, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        z = layer._responses(x)  # bf16, as the forward sees it
        pi = layer.gate(x)
    assert pi.dtype == torch.float32
    s = z.double().square().mean(-1)
    ref = torch.softmax(s, dim=-1)
    assert (pi.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(rank=0), "rank"),
        (dict(gate="topk", num_experts=3, top_k=4), "top_k"),
        (dict(gate="topk", num_experts=3, top_k=0), "top_k"),
        (dict(gate="hash"), "gate"),
        (dict(reg="l2"), "reg"),
        (dict(gate="single", num_experts=3), "single"),
    ],
)
def test_bad_config_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PASsConfig(**kwargs)


def test_bad_base_fails_clearly():
    with pytest.raises(TypeError, match="nn.Linear"):
        PASsMoELinear(nn.Conv1d(2, 2, 1), PASsConfig())


def test_inject_matches_pattern_and_refuses_twice():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4), "other": nn.Linear(4, 4)})
    names = inject(model, PASsConfig(num_experts=2, rank=2))
    assert sorted(names) == ["k_proj", "q_proj"]
    assert isinstance(model["other"], nn.Linear)
    with pytest.raises(RuntimeError, match="already"):
        inject(model, PASsConfig())
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject(nn.Sequential(nn.Linear(2, 2)), PASsConfig(), target="nothing")


def test_hand_written_backward_passes_gradcheck():
    # planted bugs: the softmax's backward without its mean term, tau left out of it, ds/dz
    # without its factor 2 / r, the scaling applied twice in _MixLowRank's backward
    from pasmoe import _EnergyGate, _MixLowRank

    z = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1).requires_grad_()
    B = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, pi, B: _MixLowRank.apply(z, pi, B, 1.7), (z, pi, B))
    assert torch.autograd.gradcheck(lambda z: _EnergyGate.apply(z, 1.7), (z,))


def test_reads_inputs_as_a_linear_does_float64_and_unbatched_too():
    # planted bugs: importance counted with pi in another dtype than z (einsum fails under
    # float64), an unbatched (d,) input refused although nn.Linear takes it
    layer = make_layer("pas").double()
    x = torch.randn(D_IN, dtype=torch.float64)
    with torch.no_grad(), track_importance(layer):
        y = layer(x)
    assert y.shape == (D_OUT,) and layer.task_tokens.item() == 1
    assert torch.allclose(y, layer(x.unsqueeze(0))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_a_lora_of_the_same_total_rank(dtype):
    """Deterministic memory check (timings live in bench.py): the layer keeps z and pi only."""
    # planted bug: autograd-written gate and mixing (keeps z * pi and a permuted B: ~2.5x)
    from helpers import PlainLoRA, saved_bytes

    n, d, E, r = 64, 32, 4, 8
    base = nn.Linear(d, d).to(dtype)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    same_dtype = PASsConfig(num_experts=E, rank=r, adapter_dtype=None)  # like the LoRA it is compared with
    pas = saved_bytes(PASsMoELinear(base, same_dtype), x)
    lora = saved_bytes(PlainLoRA(base, E * r), x)
    size = torch.finfo(dtype).bits // 8
    assert lora == n * E * r * size  # z
    assert pas == n * E * r * size + n * E * 4  # z, and pi in fp32


def test_stabilization_drift_backward_passes_gradcheck():
    # planted bug: the hand-written backward of Eq. 11 without the factor 2, or w on the wrong axis
    from pasmoe import _WeightedDrift

    w = torch.rand(3, 4, dtype=torch.float64)
    A, A0 = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randn(3, 4, 5, dtype=torch.float64)
    B, B0 = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: _WeightedDrift.apply(a, A0, b, B0, w), (A, B))
    rows = sum(w[e, k] * ((A[e, k, :] - A0[e, k, :]) ** 2).sum() for e in range(3) for k in range(4))
    columns = sum(w[e, k] * ((B[e, :, k] - B0[e, :, k]) ** 2).sum() for e in range(3) for k in range(4))
    assert torch.allclose(_WeightedDrift.apply(A, A0, B, B0, w), torch.stack([rows, columns]))


def test_dropout_acts_on_the_adapter_input_only():
    # planted bugs: dropout also on the base's input, or never applied in training
    layer = make_layer("pas", dropout=0.5, adapter_dtype=None).double()
    x = torch.randn(6, D_IN, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    ref, _ = reference(layer, xd, A, B, layer.base.weight.double(), layer.base.bias.double(), None)
    base_shift = (layer.base(x) - layer.base(xd)).detach()  # the base sees the undropped x
    assert torch.allclose(y, ref + base_shift, rtol=1e-10, atol=1e-10)
    layer.eval()
    ref_eval, _ = reference(layer, x, A, B, layer.base.weight.double(), layer.base.bias.double(), None)
    assert torch.allclose(layer(x), ref_eval, rtol=1e-10, atol=1e-10)


def test_random_permutation_depends_on_seed_and_layer_index():
    # planted bug: one permutation for every layer (then "random" targets the same slots everywhere)
    def perm(seed, index):
        return PASsMoELinear(nn.Linear(4, 4), PASsConfig(num_experts=3, rank=4, reg="random", seed=seed), index).perm

    assert torch.equal(perm(0, 0), perm(0, 0))
    assert not torch.equal(perm(0, 0), perm(1, 0)) and not torch.equal(perm(0, 0), perm(0, 1))
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4)})
    inject(model, PASsConfig(num_experts=3, rank=4, reg="random"))
    assert not torch.equal(model["q_proj"].perm, model["k_proj"].perm)
