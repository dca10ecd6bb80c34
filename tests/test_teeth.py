"""Tests with teeth for the newer code: each one fails on a realistic one-line bug (named in its
`# planted bug:` comment) that the rest of the suite lets pass.

Scorers' marker precedence, the t-interval's degrees of freedom, which runs the study reads for a
claim, the direction of a mechanism value, --seed reaching the permuted weights, a prompt method's inputs at
generation, HiDe's fusion of the seen experts only, and what seqft trains and saves. The model tests
use a barely pretrained tiny base (SMALL, as tests/test_train_stream.py), built once per module."""

import contextlib
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import SMALL, ExpertLayers, only_read
from safetensors.torch import load_file
from torch import nn

import config
import data
import evaluate
import llava_wrap
import train_stream as ts
from baselines import METHODS, HiDe, SeqFT
from data import Example, Task
from engine.runs import RunDir
from lab import stats, study

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny base built once, before any test: every test then loads it from disk."""
    path = str(tmp_path_factory.mktemp("cache"))
    config.load_model(ts.parse_args(SMALL + ["--cache-dir", path])[0], CPU)
    return path


def small(cache, *extra):
    return ts.parse_args(only_read(SMALL + ["--cache-dir", cache, *extra]))[0]


def passes(bundle, cfg):
    collate = data.Collator(bundle.tokenizer, bundle.num_image_tokens, cfg.max_length)
    return collate, llava_wrap.passes(bundle, collate, CPU, cfg.eval_batch_size, contextlib.nullcontext)


# ---- 1. scorers: which answer marker wins ----


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("<think>the answer: 4 is wrong</think> 5", "5"),  # "answer:" inside the reasoning
        ("<THINK>so Answer: 4</THINK>\n 5 ", "5"),  # tags and marker in any case
        ("<think>answer: 4</think>\n\n<answer>5</answer>", "5"),  # an "answer:" inside <think>, then <answer>
        ("<think>x</think> answer: 4 <answer>5</answer> answer: 6", "5"),  # <answer> over both
        ("reasoning, answer: 5", "5"),  # "answer:" alone
    ],
)
def test_answer_tag_wins_over_think_which_wins_over_answer_colon(reply, expected):
    # planted bug: the marker loop's order swapped to ("answer:", "</think>") (an "answer:" in the
    # reasoning then wins over the text after </think>); also the <answer> check moved after the loop
    assert evaluate.extract_answer(reply) == expected


@pytest.mark.parametrize("metric", ["exact", "first_token", "first_char", "rouge_l"])
def test_scores_read_the_answer_after_think_not_an_answer_colon_inside_it(metric):
    # planted bug: the marker loop's order swapped to ("answer:", "</think>"): the reply below then
    # answers "4 is wrong</think> 5" (0 on exact, first_token, first_char; below 100 on ROUGE-L)
    right = "<think>the answer: 4 is wrong, so</think> 5"
    assert evaluate.score(metric, right, "5") == 100.0
    assert evaluate.score(metric, "<think>answer: 5 maybe</think> 4", "5") == 0.0
    # the reference is read the same way: its "answer:" inside the reasoning is not its answer
    assert evaluate.score(metric, "answer: 5", "<think>answer: 4 is a guess</think> 5") == 100.0
    assert evaluate.score(metric, "<think>answer: 4</think><answer>5</answer>", "<answer>5</answer>") == 100.0


# ---- 2. the t-interval's degrees of freedom ----


@pytest.mark.parametrize("n, t", [(10, 2.2621571628), (5, 2.7764451052)])  # t_{0.975, n-1}, from tables
def test_paired_interval_half_width_uses_n_minus_1_degrees_of_freedom(n, t):
    # planted bug: len(diffs) instead of len(diffs) - 1 as df (t_{0.975,10} = 2.228 and t_{0.975,5} =
    # 2.571: the half-width 1.5% and 7.4% too narrow; the coverage simulation cannot see it)
    a = [50.0 + 3.7 * math.sin(i) + 0.3 * i for i in range(n)]
    b = [48.0 + 2.1 * math.cos(2 * i) for i in range(n)]
    diffs = [x - y for x, y in zip(a, b)]
    half = t * statistics.stdev(diffs) / math.sqrt(n)
    mean, low, high = stats.paired_difference(a, b)
    assert mean == pytest.approx(statistics.mean(diffs), rel=1e-12)
    # the table's t has 10 significant digits, so 1e-8 relative; the bug moves it by >= 1.5e-2
    assert (high - low) / 2 == pytest.approx(half, rel=1e-8)
    assert high - mean == pytest.approx(half, rel=1e-8) and mean - low == pytest.approx(half, rel=1e-8)


# ---- 3. which runs the study reads for a claim ----

MAIN = {"num_experts": 6, "lambda_a": 5e-4, "lambda_b": 5e-5, "replay_fraction": 0.1, "temperature": 1.0}
MAIN |= {"mixture_scale": "matched"}  # as RunConfig saves them
SEEDS = range(10)  # the claims' planned seeds


def run_dict(method, seed, order, R, **overrides):
    """A run as evaluate.load_run returns it (plus its analyses, none here: nothing is read from disk)."""
    config = {"method": method, "seed": seed, "order": order, "eval": "diag-last", **MAIN, **overrides}
    return {
        "dir": Path(f"/nonexistent/{method}_{order}_{seed}"),
        "tasks": ["x", "y"],
        "R": R,
        "config": config,
        "method": method,
        "metrics": evaluate.cl_metrics(R),
        "analyses": {},
    }


def main_R(method, seed, order):
    """R on the two tasks: [[d0, -], [f0, 90]]; AP = (f0 + 90) / 2, BWT = (f0 - d0) / 2 (plain)."""
    o = ("A", "B").index(order)
    if method == "joint":
        return [[None, None], [90.0, 90.0]]
    if method == "seqlora":
        f0, d0 = 50.0 + seed % 3, 90.0
    elif method == "replay":
        f0, d0 = 80.0 + seed % 3, 90.0
    else:
        i = study.CLAIM_METHODS.index(method)
        f0 = 40.0 + 4 * i + (5 + i) * o + ((3 + i) * seed % 7)  # differences vary by seed and order
        d0 = f0 + 10 + seed % 3 + i
    return [[d0, None], [f0, 90.0]]


def study_runs():
    """(runs at the main settings, runs of other settings that share a seed and method with them)."""
    main = [
        run_dict(m, s, o, main_R(m, s, o))
        for o in ("A", "B")
        for m in study.REFERENCES + study.CLAIM_METHODS
        for s in SEEDS
    ]

    def bad(f0):  # unlearned, far from every main run
        return [[30.0, None], [f0, 90.0]]

    others = [
        run_dict("pasmoe", s, o, bad(5.0 + s), lambda_a=10 * MAIN["lambda_a"], lambda_b=10 * MAIN["lambda_b"])
        for o in ("A", "B")
        for s in SEEDS
    ]
    others += [
        run_dict(m, s, o, bad(7.0 + s), num_experts=2) for o in ("A", "B") for m in ("pasmoe", "moelora") for s in SEEDS
    ]
    others += [run_dict("pasmoe", s, o, bad(9.0 + s), temperature=0.25) for o in ("A", "B") for s in SEEDS]
    others += [run_dict("replay", s, "A", bad(20.0 + s), replay_fraction=f) for f in (0.02, 0.3) for s in SEEDS]
    return main, others


def table_rows(text):
    return [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]


def expected_claims():
    """{(what, order): (each seed's a - b as printed, mean as printed)} of the AP and BWT claims, by hand."""

    def ap(m, s, o):
        R = main_R(m, s, o)
        return (R[1][0] + R[1][1]) / 2

    def bwt(m, s, o):
        R = main_R(m, s, o)
        return (R[1][0] - R[0][0]) / 2

    out = {}
    for _, what, metric, a, b in study.CLAIMS:
        if metric in ("ap", "bwt"):
            f = ap if metric == "ap" else bwt
            for o in ("A", "B"):
                diffs = [f(a, s, o) - f(b, s, o) for s in SEEDS]
                out[(what, o)] = (" ".join(f"{d:.2f}" for d in diffs), f"{statistics.mean(diffs):+.2f}")
    return out


def test_claims_calibration_and_learnability_read_only_the_main_settings(tmp_path):
    # planted bugs: a key dropped from study.DEFAULTS ("temperature": pasmoe at tau 0.25 joins the
    # claims and the learnability table; "replay_fraction": replay at 0.02 and 0.3 joins the
    # calibration, which then fails order A; "num_experts", "lambda_a" likewise), or select()
    # ignoring `want` (want = dict(DEFAULTS): orders A and B mixed)
    main, others = study_runs()
    expected = expected_claims()
    for runs in (main + others, others + main):  # whichever run of a seed comes last would win
        found = study.tables(runs, tmp_path)
        for text in (found["claims"][1], study.claims(runs)):  # the report's path, and the claims alone
            rows = {(r[1], r[2]): r for r in table_rows(text)[2:]}
            for key, (cells, mean) in expected.items():
                row = rows[key]
                assert row[3] == "10" and row[4] == cells, (key, row)
                assert row[5].startswith(mean + " ["), (key, row)
                assert not row[6].startswith(("not judged", "waiting")), (key, row)
        # calibration: the reference runs at replay_fraction 0.1 only, every order passes
        assert study.calibrated_orders(runs) == {"A", "B"}
        calibration = table_rows(found["calibration"][1])
        counts = {(r[0], r[1]): r[2] for r in calibration if r[1] in study.REFERENCES}
        assert counts == {(o, m): "10" for o in ("A", "B") for m in study.REFERENCES}, counts
        assert [r[-1] for r in calibration if r[0] in ("A", "B") and r[1] not in study.REFERENCES] == ["yes", "yes"]
        # learnability of order A: the main runs' just-trained scores, by hand
        order_a = [r for r in main if r["config"]["order"] == "A"]
        diag = {"x": [90.0 if r["method"] == "joint" else r["R"][0][0] for r in order_a], "y": [90.0] * len(order_a)}
        want = [
            [k, f"{statistics.mean(v):.1f}", f"{min(v):.1f}", f"{sum(x < 70 for x in v)} of {len(v)}"]
            for k, v in diag.items()
        ]
        assert table_rows(found["learnability"][1])[2:] == want


# ---- 4. the direction of a mechanism value ----


def mechanism_run(seed, least_A, most_A, least_B, most_B, method="pasmoe"):
    """A run whose analyses hold update sizes by importance decile (A rows and B columns), with
    analyses.update_vs_importance's ratio: the most important decile over the least important."""

    def updates(least, most):
        deciles = [least + (most - least) * k / 9 for k in range(10)]
        return {"update_by_importance_decile": deciles, "top_over_bottom": deciles[-1] / deciles[0]}

    run = run_dict(method, seed, "A", main_R(method, seed, "A"))
    run["analyses"] = {"updates": updates(least_A, most_A), "updates_B": updates(least_B, most_B)}
    return run


def test_decile_values_point_the_way_their_claims_read():
    # planted bugs: decile_gap as `ratio - 1` instead of `1 / ratio - 1` (least / most - 1); decile_B
    # read from "updates" (the A rows) instead of "updates_B"
    run = mechanism_run(0, least_A=2.0, most_A=0.5, least_B=1.0, most_B=4.0)
    assert study._value(run, "decile") == pytest.approx(0.5 / 2.0, rel=1e-12)  # most / least, A rows
    assert study._value(run, "decile_gap") == pytest.approx(2.0 / 0.5 - 1, rel=1e-12)  # least / most - 1 = 3
    assert study._value(run, "decile_B") == pytest.approx(4.0 / 1.0, rel=1e-12)  # most / least, B columns
    assert study._value({**run, "analyses": {}}, "decile_gap") is None  # no analyses: no value


def test_the_decile_claim_and_the_mechanisms_table_read_least_over_most():
    # planted bugs: decile_gap as `ratio - 1`; decile_B read from "updates" (the mechanisms table's
    # B column then repeats the A column)
    runs = [mechanism_run(s, least_A=2.0 + s, most_A=0.5, least_B=1.0, most_B=4.0 + s) for s in range(3)]
    text = study.claims(runs, calibrated={"A", "B"}, planned=3)
    row = next(r for r in table_rows(text) if r[1].startswith("update of A rows") and r[2] == "A")
    gaps = [(2.0 + s) / 0.5 - 1 for s in range(3)]  # 3, 5, 7: the least important rows move most
    assert row[4] == " ".join(f"{g:.2f}" for g in gaps) and row[5].startswith(f"{statistics.mean(gaps):+.2f} [")
    assert row[6] == "supported"
    mech = next(r for r in table_rows(study.mechanisms(runs)) if r[0] == "pasmoe")
    ratios_A, ratios_B = [0.5 / (2.0 + s) for s in range(3)], [4.0 + s for s in range(3)]
    assert mech[4].startswith(f"{statistics.mean(ratios_A):.2f} [") and mech[5].startswith(
        f"{statistics.mean(ratios_B):.2f} ["
    )


# ---- 5. --seed reaching the permuted weights ----


def test_seed_reaches_the_permutation_of_random_weights():
    # planted bug: the seed not passed to the layer (layer_args without "seed", or config.adapters giving
    # it another value): every seed then permutes alike
    layers = {s: config.adapters(ts.parse_args(["--method", "pasmoe-random", "--seed", str(s)])[0]) for s in (0, 1)}
    assert layers[1][1].keywords == {"seed": 1} and layers[0][1].keywords == {"seed": 0}

    def layer(seed):
        torch.manual_seed(0)
        pas, layer_class = layers[seed]
        return layer_class(nn.Linear(4, 3), pas, index=5)

    one, again, other = layer(1), layer(1), layer(0)
    agg = torch.arange(1.0, one.importance_agg.numel() + 1).view_as(one.importance_agg) ** 2
    w = (agg / agg.mean()).clamp(0, one.cfg.weight_clip)  # the unpermuted weights, by hand
    for lay in (one, again, other):
        lay.importance_agg.copy_(agg)
    got = one.stab_weights()  # float32; the hand computation differs by rounding at most (1e-6 relative)
    assert torch.equal(got, again.stab_weights())  # a seed's permutation is reproducible
    assert torch.allclose(got.flatten().sort().values, w.flatten().sort().values, rtol=1e-6, atol=0)  # the same values
    assert not torch.allclose(got, w, rtol=1e-2) and not torch.allclose(got, other.stab_weights(), rtol=1e-2)


# ---- 6. a prompt method's inputs reach generation ----


def greedy_by_hand(bundle, batch, steps):
    """Greedy decode of one prompt with llava_wrap.forward on the growing sequence (the input hook
    included), the <image> token suppressed as generate does; stops at EOS."""
    ids, new = batch["input_ids"], []
    for _ in range(steps):
        grown = {
            "input_ids": torch.cat([ids, torch.tensor(new, dtype=ids.dtype).view(1, -1)], 1),
            "attention_mask": torch.ones(1, ids.shape[1] + len(new), dtype=torch.long),
            "examples": batch["examples"],
        }
        logits = llava_wrap.forward(bundle, grown)[0, -1].clone()
        logits[bundle.model.config.image_token_index] = -math.inf
        new.append(int(logits.argmax()))
        if new[-1] == bundle.tokenizer.eos_token_id:
            break
    return bundle.tokenizer.decode(new, skip_special_tokens=True)


def test_generation_feeds_the_prompts_of_l2p(cache):
    # planted bug: llava_wrap.generate calling `embed(bundle, batch)` with the batch's attention mask
    # instead of `inputs(bundle, batch)` (the prompts never reach generation: L2P answers as the base)
    cfg = small(cache, "--method", "l2p")
    bundle = config.load_model(cfg, CPU)
    collate, found = passes(bundle, cfg)
    tasks = config.load_tasks(cfg)
    method = METHODS["l2p"].cls(cfg, bundle.model, tasks, *found)
    run = ts.Run(cfg, RunDir(cfg.out), 0, 1, CPU, tasks, bundle, bundle.model, collate, method, {})
    steps = 6
    with torch.no_grad():
        for task in tasks:  # numglue (text only) and art (with images)
            ex = task.test[0]
            batch = collate.prompts([ex])
            bundle.input_hook = None
            plain = llava_wrap.generate(bundle, batch, steps)
            _, plain_rows = ts.evaluate_task(run, task)
            bundle.input_hook = method.inputs
            prompted = llava_wrap.generate(bundle, batch, steps)
            # tokens, not floats: the cached decode and the full forwards differ by ~1e-6 in the logits,
            # while the top two logits of these steps lie >= 1e-2 apart (measured), so argmaxes agree
            assert prompted == [greedy_by_hand(bundle, batch, steps)], task.key
            assert prompted != plain, task.key  # the prompts change these replies: the check can see them
            _, rows = ts.evaluate_task(run, task)  # the loop's path, batched
            assert [r["text"] for r in rows] != [r["text"] for r in plain_rows], task.key


# ---- 7. HiDe fuses the seen experts only ----


def three_tasks(n=20, seed=0):
    """Three text tasks with features in separate clusters, and a features() that returns them."""
    g = torch.Generator().manual_seed(seed)
    centres = {"numglue": torch.full((8,), 2.0), "fomc": torch.full((8,), -2.0), "math": torch.tensor([2.0, -2.0] * 4)}
    feats, tasks = {}, []
    for key, centre in centres.items():
        items = {split: [Example(key, f"{key}-{split}-{i}", "q", "a") for i in range(n)] for split in ("train", "test")}
        for ex in items["train"] + items["test"]:
            feats[ex] = centre + 0.8 * torch.randn(8, generator=g)
        tasks.append(Task(key, items["train"], items["test"]))
    return tasks, feats


def test_hide_fuses_only_the_seen_experts_and_restores_everything():
    # planted bug: `layer.lora_A[:self.seen].sum(0)` changed to `layer.lora_A.sum(0)` (the unseen
    # task's random A joins the fusion); also a gate or tensor not restored on exit
    tasks, feats = three_tasks()

    def features(examples):
        return [{"image": None, "text": feats[ex]} for ex in examples]

    model = ExpertLayers(experts=3, trained=2)
    method = HiDe(SimpleNamespace(seed=0), model, tasks, None, features)
    for t in range(2):  # tasks 0 and 1 trained; task 2 not yet
        method.begin_task(t)
        method.end_task(t)
    low, top = model.layers[0]["proj"], model.layers[1]["proj"]
    assert low.lora_A[2].abs().sum() > 0 and low.lora_B[2].abs().sum() == 0  # the unseen expert, as reset
    before = {
        name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.chosen)
        for name, layer in method.layers.items()
    }
    examples = [tasks[0].test[0], tasks[1].test[0], tasks[2].test[0]]
    # the top layer's mixture by hand: softmax(cos(feature, seen task's mean train feature) / 0.1)
    anchors = torch.stack([torch.stack([feats[ex] for ex in tasks[s].train]).mean(0) for s in range(2)])
    expected = torch.zeros(3, 3)
    for i, ex in enumerate(examples):
        cos = torch.stack([F.cosine_similarity(feats[ex], anchors[s], dim=0) for s in range(2)])
        expected[i, :2] = torch.softmax(cos / 0.1, dim=0)
    A, B = before["layers.0.proj"][0], before["layers.0.proj"][1]
    with method.evaluating(examples):
        assert torch.allclose(low.lora_A[0], A[0] + A[1], atol=1e-6) and torch.allclose(
            low.lora_B[0], B[0] + B[1], atol=1e-6
        )
        assert torch.equal(low.lora_A[1:], A[1:]) and torch.equal(low.lora_B[1:], B[1:])  # only expert 0 changes
        assert torch.equal(low.chosen, torch.tensor([1.0, 0.0, 0.0]))
        assert top.chosen.shape == (3, 1, 3) and torch.allclose(top.chosen[:, 0], expected, atol=1e-5)
        assert torch.equal(top.lora_A, before["layers.1.proj"][0])  # the top layer is not fused
    for name, layer in method.layers.items():
        A, B, gate = before[name]
        assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B), name
        assert layer.chosen is gate, name  # task 1's one-hot gate, as begin_task left it


# ---- 8. what seqft trains and saves ----


def test_seqft_trains_and_saves_the_language_model_head_and_projector_in_fp32(cache, tmp_path):
    # planted bugs: the vision tower left trainable; lm_head or the projector not unfrozen (a name
    # dropped from SeqFT's tuple); a trained part missing from the checkpoint (adapter_state keeping
    # only 2-d parameters: the norms are lost)
    cfg = small(cache, "--method", "seqft", "--dtype", "bfloat16")
    bundle = config.load_model(cfg, CPU)
    model = bundle.model
    SeqFT(cfg, model, config.load_tasks(cfg), *passes(bundle, cfg)[1])
    parts = ("model.language_model.", "lm_head.", "model.multi_modal_projector.")
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if n.startswith(parts)}
    assert all(any(n.startswith(p) for n in expected) for p in parts)  # each part has parameters
    assert any(n.startswith("model.vision_tower.") for n in names)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == expected, (sorted(trainable - expected)[:3], sorted(expected - trainable)[:3])
    assert all(params[n].dtype == torch.float32 for n in expected)  # master weights in fp32
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n.startswith("model.vision_tower."))
    path = tmp_path / "task1.safetensors"
    llava_wrap.save_adapters(model, path)
    saved = load_file(path)
    assert set(saved) == expected, (sorted(set(saved) - expected)[:3], sorted(expected - set(saved))[:3])
    for n in expected:
        assert saved[n].dtype == torch.float32 and torch.equal(saved[n], params[n].detach()), n


def test_a_seqft_run_checkpoints_exactly_the_trained_parts(cache, tmp_path):
    # planted bug: a trained part missing from the checkpoint (adapter_state keeping only 2-d
    # parameters); the vision tower left trainable (then saved as well)
    out = tmp_path / "run"
    ts.run(small(cache, "--method", "seqft", "--out", str(out)))
    model = config.load_model(small(cache, "--method", "seqft"), CPU).model
    parts = ("model.language_model.", "lm_head.", "model.multi_modal_projector.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(parts)}
    for t in (1, 2):
        saved = load_file(out / "ckpt" / f"task{t}.safetensors")
        assert set(saved) == expected, (t, sorted(set(saved) - expected)[:3], sorted(expected - set(saved))[:3])
        assert all(v.dtype == torch.float32 for v in saved.values())
