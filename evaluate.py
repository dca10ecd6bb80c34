"""Scoring, continual-learning metrics, reports and figures for PASs-MoE runs.

    score(metric, prediction, reference)   one answer, 0-100 (MLLM-CTBench's scorers)
    cl_metrics(R)                          AP, BWT (paper and standard), per-task Acc/Forget
    report(runs)                           the paper's Table 1 layout, mean +- std over seeds
    analyses(run_dir)                      router drift, importance map, update magnitude vs
                                           importance, loss curves, accuracy heatmap

    python evaluate.py RUN_DIR [RUN_DIR ...]      print and write report.md (and figures)

R[i][j] is the score on task j after training task i (rows and columns 0-based); null
cells are tasks not evaluated at that point. Metrics follow SPEC section 5:
    Acc_t = R[T-1][t]    Forget_t = R[T-1][t] - R[t][t]    AP = mean_t Acc_t
    BWT (paper) = sum_{t<T-1} Forget_t / T    BWT (standard) = same sum / (T-1)
This file stands alone (no import of the other project files).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

# ---- answer extraction and scorers ----

TASK_METRICS = {  # MLLM-CTBench task key -> scorer (SPEC section 6)
    "numglue": "exact",
    "art": "rouge_l",
    "math": "first_token",
    "fomc": "first_char",
    "medical": "rouge_l",
    "OCR": "exact",
    "science": "first_token",
}

_ANSWER = re.compile(r"answer:", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"(?<!\d)\.(?!\d)|[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:'|~]")


def extract_answer(text: str) -> str | None:
    """The text after the last "answer:" (case-insensitive), stripped; None if absent."""
    found = list(_ANSWER.finditer(text))
    return text[found[-1].end():].strip() if found else None


def normalize(text: str) -> str:
    """VQA-style normalization: lowercase, punctuation off (decimal points kept),
    number words to digits, articles dropped, whitespace collapsed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _rouge_l(prediction: str, reference: str) -> float:
    from rouge_score import rouge_scorer  # imported here: scoring without ROUGE tasks needs nothing

    scorer = _rouge_l.__dict__.setdefault("scorer", rouge_scorer.RougeScorer(["rougeL"]))
    return 100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure


def score(metric: str, prediction: str, reference: str) -> float:
    """Score one prediction against its reference, in [0, 100].

    Both are full answers (reasoning, then "answer: ..."); the final answers are compared.
    A prediction without "answer:" is wrong; a reference without it is all final answer.
    """
    pred = extract_answer(prediction)
    if pred is None:
        return 0.0
    ref = extract_answer(reference)
    ref = reference.strip() if ref is None else ref
    if metric == "exact":
        return 100.0 * (normalize(pred) == normalize(ref))
    if metric == "first_token":
        p, r = normalize(pred).split(), normalize(ref).split()
        return 100.0 * bool(p and r and p[0] == r[0])
    if metric == "first_char":
        p, r = pred.lstrip()[:1].upper(), ref.lstrip()[:1].upper()
        return 100.0 * bool(p and p == r)
    if metric == "rouge_l":
        return _rouge_l(pred, ref)
    raise ValueError(f"unknown metric {metric!r}: choose one of exact, first_token, first_char, rouge_l")


# ---- continual-learning metrics ----


def cl_metrics(R: list[list[float | None]]) -> dict:
    """AP, BWT and per-task final accuracy and forgetting from the accuracy matrix R (T x T).

    Needs the last row and the diagonal; other cells may be None.
    """
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"R must be a square T x T matrix, got row lengths {[len(row) for row in R]}")
    final = R[-1]
    missing = [t for t in range(T) if final[t] is None or R[t][t] is None]
    if missing:
        raise ValueError(f"R lacks the last row or the diagonal for tasks {missing}: cannot compute AP/BWT")
    forget = [final[t] - R[t][t] for t in range(T - 1)] + [None]
    total = sum(forget[:-1])
    return {
        "ap": sum(final) / T,
        "bwt": total / T,  # the paper's convention (SPEC section 5)
        "bwt_standard": total / (T - 1) if T > 1 else None,  # Lopez-Paz & Ranzato
        "final": list(final),
        "forget": forget,
    }


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
    return {"dir": run_dir, "tasks": matrix["tasks"], "R": matrix["R"], "config": config,
            "method": config.get("method", run_dir.name), "metrics": cl_metrics(matrix["R"])}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


_NOT_A_SETTING = {"seed", "out", "resume", "versions", "commit", "device", "started", "argv", "world_size"}


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
            cells.append(_mean_std([m["final"][t] for m in ms]))
            cells.append("-" if t == len(tasks) - 1 else _mean_std([m["forget"][t] for m in ms]))
        summary = [_mean_std([m[k] for m in ms]) for k in ("ap", "bwt", "bwt_standard")]
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells + summary) + " |")
    return "\n".join(lines) + "\n"


def matrix_table(run: dict) -> str:
    """The accuracy matrix as markdown: rows = after training task i."""
    tasks = run["tasks"]
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for i, row in enumerate(run["R"]):
        lines.append(f"| {tasks[i]} | " + " | ".join("" if v is None else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


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
    out = args.out or (args.runs[0] / "report.md" if len(runs) == 1 else args.runs[0].parent / "report.md")
    out.write_text(text)
    print(text + f"\nwritten to {out}")


if __name__ == "__main__":
    main()
