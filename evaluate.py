"""Scoring, continual-learning metrics, and one run's report and figures.

    score(metric, prediction, reference)   one answer, 0-100 (MLLM-CTBench's scorers)
    cl_metrics(R)                          AP, BWT (paper and standard), per-task Acc/Forget
    paired_difference(a, b)                mean and t-interval of a - b over paired seeds
    report(runs)                           the paper's Table 1 layout, mean +- std over seeds
    analyses(run)                          router drift (Fig. 3), importance concentration and
                                           map (Fig. 8), update size vs importance (Fig. 6)
    figures(run, found)                    the above as PNG, plus loss curves and the matrix

    python evaluate.py RUN_DIR [RUN_DIR ...]      print and write report.md (and figures)

R[i][j] is the score on task j after training task i (rows and columns 0-based); null
cells are tasks not evaluated at that point. Metrics as the paper defines them (DESIGN.md, "Metrics"):
    Acc_t = R[T-1][t]    Forget_t = R[T-1][t] - R[t][t]    AP = mean_t Acc_t
    BWT (paper) = sum_{t<T-1} Forget_t / T    BWT (standard) = same sum / (T-1)
This file stands alone (no import of the other project files). The study's tables are study.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from functools import lru_cache
from pathlib import Path

# ---- answer extraction and scorers ----

TASK_METRICS = {  # MLLM-CTBench task key -> scorer (its llava_cl/eval_tool scorers)
    "numglue": "exact",
    "art": "rouge_l",
    "math": "first_token",
    "fomc": "first_char",
    "medical": "rouge_l",
    "OCR": "exact",
    "science": "first_token",
}

# VQA-style normalization, rule by rule as MLLM-CTBench's scorers apply it (they inherit it
# from the VQA evaluation code): punctuation, lowercase, number words, articles, contractions.
_VQA_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit: "3." -> "3", "3.5" stays
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
# The VQA table of contractions written without their apostrophe, as the benchmark applies it:
# after lowercasing, so only its lowercase entries can match (its "Im", "Ive", "Id've" never do).
_CONTRACTIONS = dict(pair.split(">") for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll
maam>ma'am mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've
mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't
ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've
shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've
somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll
somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
something'dve>something'd've somethingll>something'll thats>that's thered>there'd
thered've>there'd've there'dve>there'd've therere>there're theres>there's theyd>they'd
theyd've>they'd've they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas
wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're
whats>what's whatve>what've whens>when's whered>where'd wheres>where's whereve>where've whod>who'd
whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're
whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've
yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've
y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
""".split())


def extract_answer(text: str) -> str | None:
    """The final answer of a reply, stripped, or None when the reply has no final answer.

    The benchmark's files write replies in three ways; the first that applies wins:
      1. the content of the last <answer>...</answer> (one left open, as by the token budget
         cutting the reply: everything after it);
      2. else the text after the last </think>;
      3. else the text after the last "answer:".
    Tags and marker in any case.
    """
    low = text.lower()
    if (i := low.rfind("<answer>")) >= 0:
        rest = text[i + len("<answer>"):]
        j = rest.lower().find("</answer>")
        return (rest if j < 0 else rest[:j]).strip()
    for marker in ("</think>", "answer:"):
        if (i := low.rfind(marker)) >= 0:
            return text[i + len(marker):].strip()
    return None


def _strip_punctuation(text: str) -> str:
    """A mark next to a space, or any mark in a text with a comma between digits, is deleted
    ("1,000" -> "1000"); a mark inside a word becomes a space ("red/blue" -> "red blue")."""
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        glued = digit_comma or (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out)


def normalize(text: str) -> str:
    """VQA normalization: punctuation as above, lowercase, number words to digits, articles
    dropped, contractions restored ("dont" -> "don't"), whitespace collapsed. If that leaves
    nothing (the answer "A" is an article), the lowercased text without punctuation is kept
    instead, as the benchmark does (it keeps the case there; we lowercase, so "a" and "A" agree)."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    kept = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(kept) or " ".join(words)


def _rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer  # imported here: scoring without ROUGE tasks needs nothing

    scorer = _rouge_l.__dict__.setdefault("scorer", rouge_scorer.RougeScorer(["rougeL"]))
    return 100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure


def _first_alnum(text: str) -> str:
    return next((c for c in text.lower() if c.isalnum()), "")


def score(metric: str, prediction: str, reference: str) -> float:
    """Score one reply against its reference, in [0, 100].

    Both are read with extract_answer. A reply without a final answer, or with an empty one,
    scores 0; a reference without one is all final answer. The rules of each metric follow the
    benchmark's scorers, with the deviations listed in DESIGN.md ("Scorers"):
        exact        VQA-normalized strings are equal (numglue, OCR)
        first_token  the reply's first word, lowercased, equals the whole lowercased reference
                     (math, science); no normalization, as in the benchmark
        first_char   the first letter or digit of each, case-insensitive (fomc); brackets
                     and spaces are skipped, so "(A)" matches "A" and not "(B)"
        rouge_l      ROUGE-L F1 x 100 of the VQA-normalized texts (art, medical), rouge-score
    """
    pred = extract_answer(prediction)
    if not pred:
        return 0.0
    ref = extract_answer(reference)
    ref = reference.strip() if ref is None else ref
    if metric == "exact":
        p = normalize(pred)
        return 100.0 * bool(p and p == normalize(ref))
    if metric == "first_token":
        gold = {"y": "yes", "n": "no"}.get(ref.lower(), ref.lower())
        return 100.0 * (pred.lower().split()[0] == gold)
    if metric == "first_char":
        p = _first_alnum(pred)
        return 100.0 * bool(p and p == _first_alnum(ref))
    if metric == "rouge_l":
        return _rouge_l(normalize(pred), normalize(ref))
    raise ValueError(f"unknown metric {metric!r}: choose one of exact, first_token, first_char, rouge_l")


# ---- continual-learning metrics ----


def cl_metrics(R: list[list[float | None]]) -> dict:
    """AP, BWT and per-task final accuracy and forgetting from the accuracy matrix R (T x T).

    Needs the last row and the diagonal; other cells may be None. A run that has only its
    last row (joint training: no task was evaluated right after its own training) gets AP
    and None for BWT and forgetting.
    """
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"R must be a square T x T matrix, got row lengths {[len(row) for row in R]}")
    final = R[-1]
    if any(v is None for v in final):
        raise ValueError(f"R lacks cells of its last row (tasks {[t for t, v in enumerate(final) if v is None]}): cannot compute AP")
    missing = [t for t in range(T - 1) if R[t][t] is None]
    if missing and len(missing) < T - 1:
        raise ValueError(f"R lacks the diagonal for tasks {missing}: cannot compute BWT")
    if missing:  # last row only
        forget, bwt, bwt_standard = [None] * T, None, None
    else:
        forget = [final[t] - R[t][t] for t in range(T - 1)] + [None]
        total = sum(forget[:-1])
        bwt = total / T  # the paper's convention (DESIGN.md, "Metrics")
        bwt_standard = total / (T - 1) if T > 1 else None  # Lopez-Paz & Ranzato
    return {"ap": sum(final) / T, "bwt": bwt, "bwt_standard": bwt_standard, "final": list(final), "forget": forget}


def just_trained(R: list[list[float | None]]) -> list[float]:
    """Each task's score right after its own training, R[t][t]; for a run with only its last
    row (joint), the final scores, since every task was trained at the end."""
    return [R[t][t] if R[t][t] is not None else R[-1][t] for t in range(len(R))]


# ---- paired comparisons over seeds ----


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tail = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1 - front * _betacf(b, a, 1 - x) / b
    return 1 - tail / 2 if t > 0 else tail / 2


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on _t_cdf; p in (0.5, 1))."""
    low, high = 0.0, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a - b over paired seeds, with a Student-t interval on the differences.

    a[i] and b[i] come from the same seed (the same data, task order and initialization), so the
    seed's own effect cancels in a[i] - b[i]: the interval is that of the differences' mean,
    mean +- t(confidence, n - 1) * sd / sqrt(n). The t-interval holds its coverage at 5 to 20 seeds
    when the differences are roughly normal (tests/test_study.py checks it by simulation); a
    percentile bootstrap does not: on 2,000 simulated sets of 10 normal differences, its nominal
    95% interval (1,000 resamples) covered the true mean in 89% of them, since it takes its width
    from the sample's own spread with normal-like tails.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_difference needs two lists of the same length >= 2, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    half = t_quantile(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


# ---- reports ----


def load_run(run_dir: Path) -> dict:
    """A run's matrix (required), config and metrics (optional) as one dict."""
    run_dir = Path(run_dir)
    path = run_dir / "matrix.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a run directory of train_stream.py?")
    matrix = json.loads(path.read_text())
    if "tasks" not in matrix or "R" not in matrix:
        raise ValueError(f"{path} must hold {{'tasks': [...], 'R': [[...]]}}, found keys {sorted(matrix)}")
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    metrics = cl_metrics(matrix["R"])
    if (run_dir / "metrics.json").exists():  # timings and truncation counts come from the run
        saved = json.loads((run_dir / "metrics.json").read_text())
        metrics |= {k: saved[k] for k in ("train_s", "eval_s", "truncated", "task_id_accuracy") if k in saved}
    return {"dir": run_dir, "tasks": matrix["tasks"], "R": matrix["R"], "config": config,
            "method": config.get("method", run_dir.name), "metrics": metrics}


def _pm(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


_NOT_A_SETTING = {"seed", "out", "versions", "commit", "device", "device_name", "started", "argv", "world_size", "base_info",
                  "pas_config", "image_root", "data_root", "cache_dir"}  # pas_config follows from the rest; the others are paths


def _settings(run: dict) -> dict:
    return {k: v for k, v in run["config"].items() if k not in _NOT_A_SETTING}


def group_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs whose configs differ only by seed (and paths) form one group.

    A group is labelled by its method plus the settings that differ between groups.
    """
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(json.dumps(_settings(run), sort_keys=True, default=str), []).append(run)
    firsts = [_settings(g[0]) for g in groups.values()]
    varying = sorted({k for s in firsts for k in s if k != "method" and any(t.get(k) != s.get(k) for t in firsts)})
    labelled = {}
    for members in groups.values():
        s = _settings(members[0])
        extra = ", ".join(f"{k}={s.get(k)}" for k in varying)
        labelled[members[0]["method"] + (f" ({extra})" if extra else "")] = members
    return labelled


def report(runs: list[dict]) -> str:
    """Markdown in the layout of the paper's Table 1; runs of one label are averaged."""
    tasks = runs[0]["tasks"]
    for run in runs:
        if run["tasks"] != tasks:
            raise ValueError(f"{run['dir']} has tasks {run['tasks']}, the first run has {tasks}")
    groups = group_runs(runs)
    head = "| method | seeds | " + " | ".join(f"{t} Acc | {t} Fgt" for t in tasks) + " | AP | BWT | BWT (T-1) |"
    lines = [head, "|" + "---|" * (2 * len(tasks) + 5)]
    for label, members in groups.items():
        ms = [m["metrics"] for m in members]
        cells = []
        for t in range(len(tasks)):
            cells.append(_pm([m["final"][t] for m in ms]))
            cells.append("-" if t == len(tasks) - 1 else _pm([m["forget"][t] for m in ms]))
        summary = [_pm([m[k] for m in ms]) for k in ("ap", "bwt", "bwt_standard")]
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells + summary) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(run: dict) -> str:
    """The accuracy matrix as markdown: rows = after training task i."""
    tasks = run["tasks"]
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for i, row in enumerate(run["R"]):
        lines.append(f"| {tasks[i]} | " + " | ".join("" if v is None else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


# ---- analyses of one run (paper Fig. 3, 6, 8) ----


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits, row by row: (n, E), (n, E) -> (n,), in [0, 1]."""
    import torch

    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-12).log2() - b.clamp_min(1e-12).log2()), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def router_drift(run_dir: Path, tasks: list[str]) -> dict | None:
    """Per old task: mean over layers and tokens of JS(gates right after its task, gates at the end)."""
    import torch

    gates = Path(run_dir) / "gates"
    out = {}
    for key in tasks[:-1]:
        after, final = gates / f"{key}_after.pt", gates / f"{key}_final.pt"
        if not (after.exists() and final.exists()):
            return None
        a, f = torch.load(after), torch.load(final)
        per_layer = {name: js_divergence(a[name], f[name]).mean().item() for name in a if a[name].shape[-1] > 1}
        if not per_layer:  # one expert: nothing is routed
            return None
        out[key] = {"mean": sum(per_layer.values()) / len(per_layer), "per_layer": per_layer}
    return out


@lru_cache(maxsize=32)
def _checkpoint_part(path: str, mtime_ns: int, suffix: str) -> dict:
    """The tensors of one task checkpoint whose names end in `suffix`, by layer name: read once
    however many analyses ask (the mtime is part of the key), and never the whole file (at 7B a
    checkpoint holds gigabytes of anchors; seqft's, the whole language model)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k[: -len(suffix) - 1]: f.get_tensor(k) for k in f.keys() if k.endswith("." + suffix)}


def _adapter_tensors(run_dir: Path, t: int, suffix: str) -> dict:
    path = Path(run_dir).resolve() / "ckpt" / f"task{t}.safetensors"
    return _checkpoint_part(str(path), path.stat().st_mtime_ns, suffix)


def importance_stats(run_dir: Path, T: int) -> dict:
    """I_agg after the stream, per layer; concentration = share held by the top 10% of (e, k)."""
    agg = _adapter_tensors(run_dir, T, "importance_agg")
    shares = {}
    for name, imp in agg.items():
        flat = imp.flatten().sort(descending=True).values
        top = max(1, round(0.1 * flat.numel()))
        shares[name] = (flat[:top].sum() / flat.sum()).item()
    return {"top10_share": sum(shares.values()) / len(shares), "per_layer_top10_share": shares,
            "maps": {k: v.tolist() for k, v in agg.items()}}


def update_vs_importance(run_dir: Path, T: int, factor: str = "lora_A") -> dict | None:
    """||a_ek(t) - a_ek(t-1)|| (factor "lora_A": rows of A) or ||b_ek(t) - b_ek(t-1)||
    ("lora_B": columns of B) against I_agg(t-1) (normalized per layer), pooled over layers and
    tasks 2..T, in importance deciles: does the method protect what old tasks used?"""
    import torch

    norm_dim = {"lora_A": 2, "lora_B": 1}[factor]  # A: (e, r, d) -> rows; B: (e, o, r) -> columns
    updates, importances = [], []
    for t in range(2, T + 1):
        prev, cur = _adapter_tensors(run_dir, t - 1, factor), _adapter_tensors(run_dir, t, factor)
        agg = _adapter_tensors(run_dir, t - 1, "importance_agg")
        for name in cur:
            if agg[name].any():  # joint trains only at the end: no importance before it
                updates.append((cur[name] - prev[name]).norm(dim=norm_dim).flatten())
                importances.append((agg[name] / agg[name].mean()).flatten())
    if not updates:
        return None
    u, imp = torch.cat(updates), torch.cat(importances)
    order = imp.argsort()
    deciles = [u[chunk].mean().item() for chunk in order.chunk(10)]
    return {"update_by_importance_decile": deciles,
            "top_over_bottom": deciles[-1] / deciles[0] if deciles[0] else None}  # None: the least important never moved


def analyses(run: dict) -> dict:
    """Whatever the run directory allows: router drift, importance, update magnitudes."""
    run_dir, tasks = run["dir"], run["tasks"]
    out = {}
    drift = router_drift(run_dir, tasks)
    if drift is not None:
        out["router_drift"] = {"mean": sum(d["mean"] for d in drift.values()) / len(drift),
                               "per_task": {k: d["mean"] for k, d in drift.items()}, "per_layer": {k: d["per_layer"] for k, d in drift.items()}}
    if (Path(run_dir) / "ckpt" / f"task{len(tasks)}.safetensors").exists() and _adapter_tensors(run_dir, len(tasks), "importance_agg"):
        out["importance"] = importance_stats(run_dir, len(tasks))
        updates = update_vs_importance(run_dir, len(tasks)) if len(tasks) > 1 else None
        if updates is not None:
            out["updates"] = updates
            out["updates_B"] = update_vs_importance(run_dir, len(tasks), "lora_B")
    return out


def figures(run: dict, found: dict) -> list[Path]:
    """PNG figures into RUN_DIR/figures (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(run["dir"]) / "figures"
    fig_dir.mkdir(exist_ok=True)
    made, tasks = [], run["tasks"]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=90)
        plt.close(fig)
        made.append(fig_dir / name)

    R = [[float("nan") if v is None else v for v in row] for row in run["R"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    ax.set(xticks=range(len(tasks)), yticks=range(len(tasks)), xlabel="evaluated on", ylabel="after training",
           title=f"accuracy matrix: {run['method']}")
    ax.set_xticklabels(tasks, rotation=45)
    ax.set_yticklabels(tasks)
    fig.colorbar(im)
    save(fig, "accuracy_matrix.png")

    log_path = Path(run["dir"]) / "log.jsonl"
    if log_path.exists():
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([r["task_loss"] for r in log], lw=0.8)
        for i in range(1, len(log)):
            if log[i]["task"] != log[i - 1]["task"]:
                ax.axvline(i, color="gray", lw=0.5)
        ax.set(xlabel="step", ylabel="task loss", title="training loss (lines: task boundaries)")
        save(fig, "loss.png")
    if "router_drift" in found:
        per_task = found["router_drift"]["per_task"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(per_task), list(per_task.values()))
        ax.set(ylabel="JS divergence (bits)", title="router drift: gates after the task vs at the end")
        save(fig, "router_drift.png")
    if "importance" in found:
        maps = found["importance"]["maps"]
        names = list(maps)[:7]  # the first decoder layer's seven projections
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4))
        for ax, name in zip(axes if len(names) > 1 else [axes], names):
            ax.imshow(maps[name], aspect="auto", cmap="magma")
            ax.set(title=name.rsplit(".", 1)[-1], xlabel="rank k", ylabel="expert e")
        fig.suptitle("aggregated importance I_agg (expert x rank)")
        save(fig, "importance_map.png")
    if "updates" in found:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(range(1, 11), found["updates"]["update_by_importance_decile"])
        ax.set(xlabel="old-task importance decile", ylabel="mean ||Δa_ek||", title="update size vs importance")
        save(fig, "update_vs_importance.png")
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by train_stream.py")
    parser.add_argument("--out", type=Path, default=None,
                        help="report file (default: RUN_DIR/report.md for one run, else report.md beside the runs)")
    args = parser.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    text = report(runs)
    if len(runs) == 1:
        text = matrix_table(runs[0]) + "\n" + text
        identified = runs[0]["metrics"].get("task_id_accuracy")
        if identified:  # HiDe-LLaVA, DDAS
            text += "\ntask identification (% of each task's test items given their own task's expert): " + \
                ", ".join(f"{k} {v:.1f}" for k, v in identified.items()) + "\n"
        found = analyses(runs[0])
        if found:
            (runs[0]["dir"] / "analyses.json").write_text(json.dumps(found, indent=1))
            text += "\n" + analyses_text(found)
        try:
            made = figures(runs[0], found)
            text += "\nfigures: " + ", ".join(str(p) for p in made) + "\n"
        except ImportError:
            text += "\n(no figures: pip install matplotlib)\n"
    out = args.out or (args.runs[0] / "report.md" if len(runs) == 1 else args.runs[0].parent / "report.md")
    out.write_text(text)
    print(text + f"\nwritten to {out}")


def analyses_text(found: dict) -> str:
    ratio = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731 (None: the least important decile never moved)
    lines = []
    if "router_drift" in found:
        lines.append(f"router drift (JS, bits, mean over old tasks, layers, tokens): {found['router_drift']['mean']:.4f}")
    if "importance" in found:
        lines.append(f"importance concentration: top 10% of (expert, rank) directions hold "
                     f"{100 * found['importance']['top10_share']:.1f}% of I_agg (mean over layers)")
    if "updates" in found:
        d = found["updates"]["update_by_importance_decile"]
        lines.append(f"A-row update size, least vs most important decile: {d[0]:.4f} vs {d[-1]:.4f} "
                     f"(ratio {ratio(found['updates']['top_over_bottom'])})")
    if "updates_B" in found:
        d = found["updates_B"]["update_by_importance_decile"]
        lines.append(f"B-column update size, least vs most important decile: {d[0]:.4f} vs {d[-1]:.4f} "
                     f"(ratio {ratio(found['updates_B']['top_over_bottom'])})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
