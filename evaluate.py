"""Scoring, continual-learning metrics, and one run's report and figures.

    score(metric, prediction, reference)   one answer, 0-100 (MLLM-CTBench's scorers)
    score_rows(task, examples, replies)    a task's prediction rows, as the benchmark's files hold them
    cl_metrics(R)                          AP, BWT (paper and standard), per-task Acc/Forget
    report(runs)                           the paper's Table 1 layout, mean +- std over seeds
    figures(run)                           the accuracy matrix and the loss curve as PNG

    python evaluate.py RUN_DIR [RUN_DIR ...]      print and write report.md (and figures)

R[i][j] is the score on task j after training task i (rows and columns 0-based); null
cells are tasks not evaluated at that point. Metrics as the paper defines them (DESIGN.md, "Metrics"):
    Acc_t = R[T-1][t]    Forget_t = R[T-1][t] - R[t][t]    AP = mean_t Acc_t
    BWT (paper) = sum_{t<T-1} Forget_t / T    BWT (standard) = same sum / (T-1)
This file stands alone (no import of the other project files). What the mechanisms did (router
drift, importance, updates) is lab/analyses.py's; the study's tables are lab/study.py's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())} | {
    "none": "0"
}
# The VQA table of contractions written without their apostrophe, as the benchmark applies it:
# after lowercasing, so only its lowercase entries can match (its "Im", "Ive", "Id've" never do).
_CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
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
""".split()
)


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
        rest = text[i + len("<answer>") :]
        j = rest.lower().find("</answer>")
        return (rest if j < 0 else rest[:j]).strip()
    for marker in ("</think>", "answer:"):
        if (i := low.rfind(marker)) >= 0:
            return text[i + len(marker) :].strip()
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


def score_rows(task: str, examples: list, replies: list[str]) -> tuple[float, list[dict]]:
    """(the task's score, one row per test item): question_id, prompt, text (the reply), reference and
    score, the keys the benchmark's re-scoring scripts read."""
    metric = TASK_METRICS[task]
    rows = [
        {
            "question_id": ex.id,
            "prompt": ex.problem,
            "text": reply,
            "reference": ex.solution,
            "score": score(metric, reply, ex.solution),
        }
        for ex, reply in zip(examples, replies)
    ]
    return sum(r["score"] for r in rows) / len(rows), rows


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
        raise ValueError(
            f"R lacks cells of its last row (tasks {[t for t, v in enumerate(final) if v is None]}): cannot compute AP"
        )
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
    config |= config.pop("method_args", {})  # a method's own flags read like the others
    metrics = cl_metrics(matrix["R"])
    if (run_dir / "metrics.json").exists():  # timings and truncation counts come from the run
        saved = json.loads((run_dir / "metrics.json").read_text())
        metrics |= {k: saved[k] for k in ("train_s", "eval_s", "truncated", "task_id_accuracy") if k in saved}
    return {
        "dir": run_dir,
        "tasks": matrix["tasks"],
        "R": matrix["R"],
        "config": config,
        "method": config.get("method", run_dir.name),
        "metrics": metrics,
    }


def _pm(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


_NOT_A_SETTING = {
    "seed",
    "out",
    "versions",
    "commit",
    "device",
    "device_name",
    "started",
    "argv",
    "world_size",
    "base_info",
    "pas_config",
    "image_root",
    "data_root",
    "cache_dir",
    "cpu",
    "cpu_capability",
    "threads",
}
# not settings: pas_config follows from the rest; the others are paths or what the machine is


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


def figures(run: dict) -> list[Path]:
    """accuracy_matrix.png (each cell's score written in it) and loss.png in RUN_DIR/figures; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir, tasks = Path(run["dir"]) / "figures", run["tasks"]
    fig_dir.mkdir(exist_ok=True)
    R = [[float("nan") if v is None else v for v in row] for row in run["R"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1 + 0.75 * len(tasks)), max(3.0, 0.6 + 0.6 * len(tasks))))
    image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(run["R"]):
        for j, v in enumerate(row):
            if v is not None:  # white on the dark low scores, black on the bright high ones
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="black" if v > 60 else "white")
    ax.set(
        xticks=range(len(tasks)),
        yticks=range(len(tasks)),
        xlabel="evaluated on",
        ylabel="after training",
        title=f"accuracy matrix: {run['method']} (AP {run['metrics']['ap']:.1f})",
    )
    ax.set_xticklabels(tasks, rotation=45)
    ax.set_yticklabels(tasks)
    fig.colorbar(image, label="score")
    made = [_save(fig, fig_dir / "accuracy_matrix.png", plt)]
    log_path = Path(run["dir"]) / "log.jsonl"
    if log_path.exists() and log_path.stat().st_size:
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([r["task_loss"] for r in log], lw=0.8)
        for i in range(1, len(log)):
            if log[i]["task"] != log[i - 1]["task"]:
                ax.axvline(i, color="gray", lw=0.5)
        ax.set(xlabel="step", ylabel="task loss", title="training loss (lines: task boundaries)")
        made.append(_save(fig, fig_dir / "loss.png", plt))
    return made


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by train_stream.py")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report file (default: RUN_DIR/report.md for one run, else report.md beside the runs)",
    )
    args = parser.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    text = report(runs)
    if len(runs) == 1:
        text = matrix_table(runs[0]) + "\n" + text
        identified = runs[0]["metrics"].get("task_id_accuracy")
        if identified:  # HiDe-LLaVA, DDAS
            text += (
                "\ntask identification (% of each task's test items given their own task's expert): "
                + ", ".join(f"{k} {v:.1f}" for k, v in identified.items())
                + "\n"
            )
        try:
            text += "\nfigures: " + ", ".join(str(p) for p in figures(runs[0])) + "\n"
        except ImportError:
            text += "\n(no figures: pip install matplotlib)\n"
    out = args.out or (args.runs[0] / "report.md" if len(runs) == 1 else args.runs[0].parent / "report.md")
    out.write_text(text)
    print(text + f"\nwritten to {out}")


if __name__ == "__main__":
    main()
