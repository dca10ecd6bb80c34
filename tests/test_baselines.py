"""baselines.py: what each reference method trains on, on a stream of labelled stand-in items."""

import math
from types import SimpleNamespace

import pytest

from baselines import METHODS, Joint, Method, Replay
from data import Task


def stream(sizes=(40, 30, 20)):
    return [
        Task(f"t{i}", [f"t{i}-train-{j}" for j in range(n)], [f"t{i}-test-{j}" for j in range(5)])
        for i, n in enumerate(sizes)
    ]


def cfg(fraction=0.1, seed=0):
    return SimpleNamespace(method_args={"replay_fraction": fraction}, seed=seed)


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_replay_buffer_holds_a_fraction_of_finished_tasks_train_items(fraction):
    # planted bugs: test items in the buffer, the current task in its own buffer, the flag ignored
    tasks = stream()
    replay = Replay(cfg(fraction), None, tasks)
    assert replay.examples(0) == tasks[0].train
    for t in (1, 2):
        buffer = replay.buffer(t)
        for s in range(3):
            from_s = [x for x in buffer if x.startswith(f"t{s}-")]
            expected = math.ceil(fraction * len(tasks[s].train)) if s < t else 0
            assert len(from_s) == len(set(from_s)) == expected
            assert set(from_s) <= set(tasks[s].train)
        assert sorted(replay.examples(t)) == sorted(tasks[t].train + buffer)
    assert replay.buffer(2) == Replay(cfg(fraction), None, tasks).buffer(2)  # a resumed run rebuilds it
    assert replay.buffer(2) != Replay(cfg(fraction, seed=1), None, tasks).buffer(2)


def test_joint_trains_once_on_every_tasks_train_items():
    # planted bugs: joint trains only the last task, or trains at every step (a sequential run)
    tasks = stream()
    joint = Joint(cfg(), None, tasks)
    assert joint.examples(0) is None and joint.examples(1) is None
    assert sorted(joint.examples(2)) == sorted(x for t in tasks for x in t.train)


def test_every_method_is_built_from_parts_that_exist():
    # planted bugs: a misspelt adapter layout, a layer argument that no flag provides, a flag whose
    # default is outside its own range (found only when someone runs that method)
    from torch import nn as tnn

    from pasmoe import PASsConfig, PASsMoELinear

    for name, spec in METHODS.items():
        assert issubclass(spec.cls, Method), name
        assert spec.adapters in ("mixture", "one", "per-task", None), name
        assert issubclass(spec.layer, PASsMoELinear) and set(spec.layer_args) <= {*spec.flags, "seed"}, name
        assert all(f.problem(f.default) is None for f in spec.flags.values()), name
        args = {k: spec.flags[k].default if k in spec.flags else 0 for k in spec.layer_args}
        spec.layer(tnn.Linear(4, 4), PASsConfig(num_experts=3, rank=2, stabilize=spec.stabilize), **args)


# ---- the regularization and architecture families, against float64 hand computations ----

import copy  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from baselines import EWC, MAS, LwF, OLoRA, adapter_params, distillation_kl  # noqa: E402
from pasmoe import PASsConfig, inject  # noqa: E402

V, D, R = 7, 5, 6  # vocab, width, LoRA rank


class TinyLM(nn.Module):
    """logits = W e(token) + s B A e(token): one frozen embedding, one LoRA'd output layer."""

    def __init__(self, rank=R, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, D).requires_grad_(False)
        self.out = nn.Linear(D, V, bias=False)
        inject(self, PASsConfig(num_experts=1, rank=rank, alpha=3.0, stabilize=False), target=r"^out$")
        with torch.no_grad():
            self.out.lora_B.normal_()  # nonzero B: every gradient term is exercised

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        return SimpleNamespace(logits=self.out(self.emb(input_ids) if inputs_embeds is None else inputs_embeds))


def examples(n=4, length=5, seed=1):
    """(input_ids, labels) pairs: labels -100 on the prompt, answers of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, V, (length,), generator=g)
        labels = ids.clone()
        labels[: 2 + i % 2] = -100
        out.append((ids, labels))
    return out


def forward_of(model):
    def forward(batch):
        ids = torch.stack([x for x, _ in batch])
        return model(input_ids=ids).logits, torch.stack([y for _, y in batch])

    return forward


def per_example_reference(model, ex, kind):
    """Gradients of one example's loss w.r.t. A and B by hand, float64: y_i = W h_i + s B A h_i,
    so dL/dB = s sum_i g_i (A h_i)^T and dL/dA = s sum_i B^T g_i h_i^T with g_i = dL/dy_i."""
    ids, labels = ex
    h = model.emb.weight.double()[ids]  # (n, D)
    W, A, B = model.out.base.weight.double(), model.out.lora_A[0].double(), model.out.lora_B[0].double()
    s = model.out.scaling
    y = h @ W.T + s * (h @ A.T) @ B.T  # (n, V)
    pos = [i for i in range(len(ids) - 1) if labels[i + 1] != -100]  # position i predicts token i + 1
    g = torch.zeros_like(y)
    for i in pos:
        if kind == "ewc":  # mean cross entropy over the answer tokens
            p = torch.softmax(y[i], 0)
            p[labels[i + 1]] -= 1
            g[i] = p / len(pos)
        else:  # MAS: ||y_answer||^2
            g[i] = 2 * y[i]
    dB = s * g.T @ (h @ A.T)
    dA = s * (B.T @ g.T) @ h
    return dA, dB


@pytest.mark.parametrize("kind", ["ewc", "mas"])
def test_importance_is_the_mean_of_per_example_squares_or_magnitudes(kind):
    # planted bugs: squaring the batch-mean gradient instead of each example's (EWC), the signed
    # gradient (MAS), dividing by the token count instead of the example count
    model, data_ = TinyLM(), examples()
    cls = EWC if kind == "ewc" else MAS
    args = {"ewc_gamma": 1.0, "mas_gamma": 1.0}
    method = cls(SimpleNamespace(method_args=args), model, [SimpleNamespace(train=data_)], forward_of(model))
    got = method.task_importance(data_)
    ref_A, ref_B = 0, 0
    for ex in data_:
        dA, dB = per_example_reference(model, ex, kind)
        ref_A = ref_A + (dA.square() if kind == "ewc" else dA.abs()) / len(data_)
        ref_B = ref_B + (dB.square() if kind == "ewc" else dB.abs()) / len(data_)
    assert torch.allclose(got["out.lora_A"][0].double(), ref_A, rtol=1e-4, atol=1e-9)
    assert torch.allclose(got["out.lora_B"][0].double(), ref_B, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("cls", [EWC, MAS])
def test_consolidation_penalty_is_zero_at_the_anchor_with_the_right_gradient(cls):
    # planted bugs: the anchor taken before the task trained, a missing 1/2, gamma ignored
    model, data_ = TinyLM(), examples()
    cfg = SimpleNamespace(method_args=dict(ewc_gamma=0.5, ewc_lambda=3.0, mas_gamma=0.5, mas_lambda=3.0))
    method = cls(cfg, model, [SimpleNamespace(train=data_)] * 2, forward_of(model))
    batch = {"logits": torch.zeros(1), "share": 1.0}
    assert method.extra_loss(batch)["consolidation"] == 0  # no anchor before the first task ends
    method.end_task(0)
    first = {n: v.clone() for n, v in method.importance.items()}
    method.end_task(1)  # same data again: F = 0.5 F_0 + F_1 = 1.5 F_0
    for n in first:
        assert torch.allclose(method.importance[n], 1.5 * first[n], rtol=1e-5)
    loss = method.extra_loss(batch)["consolidation"]
    assert loss.item() == 0
    params = adapter_params(model)
    delta = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(delta[n])
    loss = method.extra_loss(batch)["consolidation"]
    loss.backward()
    expected = sum(1.5 * (method.importance[n].double() * delta[n].double().square()).sum() for n in params)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)  # (lambda / 2) sum F delta^2, lambda = 3
    for n, p in params.items():
        assert torch.allclose(
            p.grad.double(), 3.0 * method.importance[n].double() * delta[n].double(), rtol=1e-4, atol=1e-9
        )


def test_distillation_kl_on_a_known_pair():
    # planted bugs: KL in the wrong direction, the temperature left out
    import math

    teacher, student = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([2, 0] / 2)
    expected = sum(pi * math.log(pi / 0.5) for pi in p)
    assert abs(distillation_kl(student, teacher, 2.0).item() - expected) < 1e-6
    assert distillation_kl(teacher, teacher, 2.0).abs().item() < 1e-7


def test_lwf_teacher_is_the_model_before_the_task():
    # planted bugs: a teacher that shares the live parameters (the term is then always 0),
    # or one taken before the previous task trained
    model, data_ = TinyLM(), examples()
    cfg = SimpleNamespace(method_args=dict(lwf_lambda=2.0, lwf_temperature=2.0))
    method = LwF(cfg, model, [None, None])
    before = copy.deepcopy(model)
    method.begin_task(1)
    with torch.no_grad():
        model.out.lora_B.add_(torch.randn_like(model.out.lora_B))
    ids = torch.stack([x for x, _ in data_])
    labels = torch.stack([y for _, y in data_])
    logits = model(input_ids=ids).logits
    n = int((labels[:, 1:] != -100).sum())
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "inputs_embeds": model.emb(ids),
        "labels": labels,
        "logits": logits,
        "n_tokens": n,
        "world": 1,
    }
    got = method.extra_loss(batch)["distill"]
    keep = labels[:, 1:] != -100
    old = before(input_ids=ids).logits[:, :-1][keep].double() / 2
    new = logits[:, :-1][keep].double() / 2
    kl = (old.softmax(-1) * (old.log_softmax(-1) - new.log_softmax(-1))).sum()
    assert got.item() > 0 and torch.allclose(got.double(), 2.0 * kl / n, rtol=1e-5)


def olora(rank=R, tasks=3):
    model = TinyLM(rank=rank)
    args = dict(olora_lambda1=0.5, olora_lambda2=0.25)
    return model, OLoRA(SimpleNamespace(weight_decay=0.0, method_args=args), model, [None] * tasks)


def test_olora_orthogonality_term_matches_a_loop():
    # planted bugs: the new slice compared with itself, or with slices of later tasks; squares
    # instead of absolute values
    model, method = olora()
    method.begin_task(2)  # k = 6 // 3 = 2: slices 0-1, 2-3, 4-5; task 2 owns 4-5
    terms = method.extra_loss({"logits": torch.zeros(1), "share": 1.0})
    A = model.out.lora_A[0].double()
    ortho = sum(abs(sum(A[i, d] * A[j, d] for d in range(D))) for i in (4, 5) for j in range(4))
    B = model.out.lora_B[0].double()
    norm = A[4:6].square().sum() + B[:, 4:6].square().sum()
    assert torch.allclose(terms["orthogonal"].double(), 0.5 * ortho, rtol=1e-5)
    assert torch.allclose(terms["l2"].double(), 0.25 * norm, rtol=1e-5)
    method.end_task(2)


def test_olora_old_slices_do_not_move_while_a_new_task_trains():
    # planted bug: gradient masks that are never registered, or left on the wrong slice
    model, method = olora()
    method.begin_task(1)
    A0, B0 = model.out.lora_A.detach().clone(), model.out.lora_B.detach().clone()
    opt = torch.optim.AdamW(adapter_params(model).values(), lr=0.1, weight_decay=0.0)
    ids = torch.stack([x for x, _ in examples()])
    for _ in range(3):
        loss = model(input_ids=ids).logits.square().mean() + sum(
            method.extra_loss({"logits": torch.zeros(1), "share": 1.0}).values()
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    method.end_task(1)
    A, B = model.out.lora_A.detach(), model.out.lora_B.detach()
    assert torch.equal(A[:, [0, 1, 4, 5]], A0[:, [0, 1, 4, 5]]) and torch.equal(
        B[..., [0, 1, 4, 5]], B0[..., [0, 1, 4, 5]]
    )
    assert not torch.equal(A[:, 2:4], A0[:, 2:4]) and not torch.equal(B[..., 2:4], B0[..., 2:4])
    assert not model.out.lora_A._backward_hooks  # masks removed when the task ends


def test_olora_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="weight-decay"):
        OLoRA(SimpleNamespace(weight_decay=0.01), TinyLM(), [None])
    with pytest.raises(ValueError, match="raise --rank"):
        olora(rank=2, tasks=3)


# ---- L2P, HiDe-LLaVA, DDAS: their selection, on hand-made features ----

from helpers import ExpertLayers  # noqa: E402

from baselines import DDAS, L2P, HiDe  # noqa: E402
from data import Example  # noqa: E402


def two_tasks(n=320, seed=0):
    """Two text tasks whose frozen features lie in clearly separate clusters, and a features() that
    returns them: the stream where a selector must identify the task."""
    g = torch.Generator().manual_seed(seed)
    centres = {"numglue": torch.full((8,), 2.0), "fomc": torch.full((8,), -2.0)}
    feats, tasks = {}, []
    for key in centres:
        items = {split: [Example(key, f"{key}-{split}-{i}", "q", "a") for i in range(n)] for split in ("train", "test")}
        for ex in items["train"] + items["test"]:
            feats[ex] = centres[key] + 0.3 * torch.randn(8, generator=g)
        tasks.append(Task(key, items["train"], items["test"]))
    return tasks, lambda examples: [{"image": None, "text": feats[ex]} for ex in examples]


def after_two_tasks(cls, tasks, features):
    """A selector method on a fresh two-layer model, through both tasks' begin and end."""
    model = ExpertLayers()
    method = cls(SimpleNamespace(seed=0), model, tasks, None, features)
    for t in range(2):
        method.begin_task(t)
        method.end_task(t)
    return model, method


@pytest.mark.parametrize("cls", [HiDe, DDAS])
def test_the_selectors_identify_the_task_when_tasks_differ(cls):
    # planted bugs: anchors (or autoencoders) indexed by the wrong task, the argmax taken over the
    # wrong axis, a softmax over the batch instead of over the tasks
    tasks, features = two_tasks()
    model, method = after_two_tasks(cls, tasks, features)
    for t, task in enumerate(tasks):
        w = method.weights(features(task.test))
        assert (w.argmax(dim=1) == t).float().mean() >= 0.95, (cls.__name__, task.key)
    with method.evaluating(tasks[0].test + tasks[1].test):
        pass
    assert set(method.task_id_accuracy()) == {"numglue", "fomc"} and min(method.task_id_accuracy().values()) >= 90


def test_ddas_sends_an_input_beyond_the_threshold_to_the_frozen_base():
    # planted bug: the best autoencoder's expert used however badly it reconstructs the input
    tasks, features = two_tasks()
    model = ExpertLayers()
    method = DDAS(SimpleNamespace(seed=0), model, tasks, None, features)
    method.begin_task(0)
    method.end_task(0)
    stranger = Example("numglue", "far", "q", "a")
    far = [{"image": None, "text": torch.full((8,), 40.0) * torch.tensor([1.0, -1.0] * 4)}]
    assert method.weights(far).sum() == 0  # no expert
    x = torch.randn(1, 3, D)  # (b, n, d): one input, as the gate is set per input
    base = model.layers[1]["proj"].base(model.layers[0]["proj"].base(x))
    method.features = lambda examples: far * len(examples)
    with torch.no_grad(), method.evaluating([stranger]):
        assert torch.allclose(model(x), base)  # experts off: the frozen base
    assert not torch.allclose(model(x), base)  # outside the context, task 0's expert is back


def test_hide_fuses_the_lower_layers_and_mixes_the_top_one():
    # planted bugs: the fusion as sum_t B_t A_t (the original's code sums A's and B's, cross terms
    # included), the mixture put in the lower layers, the experts not restored after evaluation
    tasks, features = two_tasks()
    model, method = after_two_tasks(HiDe, tasks, features)
    low, top = model.layers[0]["proj"], model.layers[1]["proj"]
    A, B = low.lora_A.detach().clone(), low.lora_B.detach().clone()
    x = torch.randn(1, 1, D)
    w = method.weights(features(tasks[1].test[:1]))
    with torch.no_grad(), method.evaluating(tasks[1].test[:1]):
        h = low(x)
        fused = low.base(x) + low.scaling * (x @ (A[0] + A[1]).T) @ (B[0] + B[1]).T
        assert torch.allclose(h, fused, atol=1e-6)
        mixed = top.base(h) + top.scaling * sum(w[0, e] * (h @ top.lora_A[e].T) @ top.lora_B[e].T for e in range(2))
        assert torch.allclose(top(h), mixed, atol=1e-6)
    assert torch.equal(low.lora_A, A) and torch.equal(low.lora_B, B)


def test_l2p_picks_the_prompts_whose_keys_are_nearest_to_the_query():
    # planted bugs: the keys farthest from the query (topk of the negated similarity), the
    # similarity as a dot product (key norms decide), the same prompts for every input
    tasks, features = two_tasks(n=4)
    model = ExpertLayers()
    method = L2P(SimpleNamespace(seed=0), model, tasks, None, features)
    keys = method.pool.keys["text"]
    with torch.no_grad():
        keys.copy_(torch.randn(keys.shape) * torch.linspace(0.1, 10, keys.shape[0]).unsqueeze(1))  # norms differ
    exs = tasks[0].test[:2] + tasks[1].test[:2]
    chosen, sims = method.select(exs)
    for ex, row in zip(exs, chosen):
        q = features([ex])[0]["text"]
        cos = torch.nn.functional.cosine_similarity(keys.detach(), q.unsqueeze(0), dim=-1)
        assert set(row.tolist()) == set(cos.topk(L2P.top_n).indices.tolist())
    assert not torch.equal(chosen[0], chosen[2])  # the two tasks' queries pick different prompts
    embeds, mask = method.inputs({"examples": exs}, torch.zeros(4, 3, D), torch.ones(4, 3, dtype=torch.long))
    assert embeds.shape == (4, L2P.top_n * L2P.length + 3, D) and mask.shape == (4, L2P.top_n * L2P.length + 3)
    assert torch.equal(embeds[0, : L2P.length], method.pool.prompts[chosen[0, 0]].detach())
