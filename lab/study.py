"""The small-scale study: is the sanity stream calibrated, and what does it say about the paper's claims?

    python -m lab.study DIR                        every part below, into DIR/runs, then DIR/results.md
    python -m lab.study DIR --parts calibration    some parts (the others stay as they are)
    python -m lab.study DIR --report               only the tables, verdicts and figures of what has run
    python -m lab.study DIR --report --docs README.md RESULTS.md LESSON.md   and the tables in these files

Runs are resumable, and several study processes may share DIR (one per core; give each
OMP_NUM_THREADS=1): a run is claimed by a lock file. Other flags of train_stream.py set the
settings every run shares (e.g. --lr 1.5e-3); a directory made with other settings is refused.

The study, in the order it must be read (the rules are the constants below, CALIBRATION, CLAIMS,
LEARNABILITY, written before any run they judge was looked at; DESIGN.md, section 8, states them):
1. calibration: methods whose behaviour is known (REFERENCES) must come out as expected on every
   order of CALIBRATED_ORDERS, by the fixed criteria of CALIBRATION, in every seed;
2. the paper's claims (CLAIMS), each a paired comparison over seeds on orders A and B: a seed is
   the same data, order and initialization for both methods. A claim is supported when the 95%
   interval of the seed-by-seed differences (lab.stats.mean_interval) excludes 0 in the claimed
   direction, contradicted when it excludes 0 in the other, and not resolved otherwise, with the
   interval's half-width: the smallest difference this study could have resolved;
3. the other systems of the paper's Table 1, the lambda frontier and the number of experts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
import statistics
import sys
from pathlib import Path

import config
import evaluate
import train_stream
from baselines import METHODS
from evaluate import just_trained, load_run
from lab import analyses
from lab.stats import mean_interval, prediction_interval

# ---- the plan ----

REFERENCES = ("seqlora", "replay", "joint")
CALIBRATED_ORDERS = ("A", "B", "C", "D")
CLAIM_METHODS = ("pasmoe", "moelora", "moelora-topk", "pas-rw", "pasmoe-random", "l2")
OTHER_METHODS = ("ewc", "mas", "lwf", "olora", "seqft", "l2p", "hide", "ddas")
WEIGHTINGS = ("pasmoe", "pasmoe-random", "l2")  # Eq. 11 with importance, permuted and uniform weights
LAMBDA_FACTORS = (10, 100, 1000, 10000)  # x the paper's (lambda_a, lambda_b); 1 is in "claims", 0 is pas-rw
SHARED = {"eval": "diag-last"}  # AP and BWT need the diagonal and the last row only

PLAN = {  # part -> (variants as (method, overrides), number of seeds)
    "calibration": ([(m, {"order": o}) for o in CALIBRATED_ORDERS for m in REFERENCES], 5),
    "claims": ([(m, {"order": o}) for o in ("A", "B") for m in CLAIM_METHODS], 10),
    "learnability": ([("moelora", {"order": o}) for o in ("C", "D")], 5),  # A and B: in "claims"
    "claims-paper": ([(m, {"order": o, "mixture_scale": "paper"}) for o in ("A", "B") for m in CLAIM_METHODS], 10),
    "baselines": ([(m, {}) for m in OTHER_METHODS], 3),
    "lambda": (
        [
            (m, {"lambda_a": f * config.RunConfig.lambda_a, "lambda_b": f * config.RunConfig.lambda_b})
            for f in LAMBDA_FACTORS
            for m in WEIGHTINGS
        ],
        3,
    ),
    "experts": ([(m, {"num_experts": E}) for E in (2, 4, 8) for m in ("moelora", "pasmoe")], 3),  # 6 is in "claims"
    "lesson": (
        [("replay", {"replay_fraction": f}) for f in (0.02, 0.3)] + [("pasmoe", {"temperature": 0.25})],
        3,
    ),  # LESSON.md
}
NAMED = ("order", "num_experts", "lambda_a", "lambda_b")  # in every run's name; other overrides are added to it

CALIBRATION = {  # fixed before any method under test was looked at (DESIGN.md, "The sanity stream")
    "learned": 70.0,  # every task scores at least this right after its own training (joint: at the end)
    "joint_ap": 80.0,  # the upper bound is high
    "seqlora_bwt": (-45.0, -10.0),  # sequential fine-tuning forgets clearly, not totally (paper BWT)
    "replay_gap": 10.0,  # replay's mean AP beats seqlora's by this much, and the seed ranges are apart
}
# Written before the scale-matched runs: where the claims are judged, the paper's main comparison,
# MoELoRA, must learn every task as the reference methods must, right after its own training, in every seed.
LEARNABILITY = {"method": "moelora", "learned": CALIBRATION["learned"]}

# The paper's claims (its sections 5.3-5.5) as differences a - b that the paper says are positive.
# b may be a number: the value the claim is measured against. Fixed before the study's runs.
CLAIMS = [
    ("1", "AP: softmax router above top-k", "ap", "moelora", "moelora-topk"),
    ("1", "AP: energy gate (PASs-RW) above softmax router", "ap", "pas-rw", "moelora"),
    ("1", "AP: + PASs-RS above PASs-RW alone", "ap", "pasmoe", "pas-rw"),
    ("1", "AP: full method above MoELoRA (paper: +5.10)", "ap", "pasmoe", "moelora"),
    ("1", "BWT: softmax router above top-k", "bwt", "moelora", "moelora-topk"),
    ("1", "BWT: energy gate above softmax router", "bwt", "pas-rw", "moelora"),
    ("1", "BWT: + PASs-RS above PASs-RW alone", "bwt", "pasmoe", "pas-rw"),
    ("2", "AP: importance weights above the same weights permuted (paper: +3.34)", "ap", "pasmoe", "pasmoe-random"),
    ("2", "BWT: importance weights above permuted", "bwt", "pasmoe", "pasmoe-random"),
    ("3", "router drift (JS bits): MoELoRA's above PASs-MoE's", "drift", "moelora", "pasmoe"),
    ("3", "router drift (JS bits): MoELoRA's above the energy gate's alone", "drift", "moelora", "pas-rw"),
    ("4", "importance: top-10% share of (expert, rank) directions above uniform (10%)", "top10", "pasmoe", 10.0),
    ("4", "importance: PASs-MoE's top-10% share above MoELoRA's", "top10", "pasmoe", "moelora"),
    ("5", "update of A rows, least / most important decile above 1", "decile_gap", "pasmoe", 0.0),
    (
        "5",
        "most / least important decile ratio: permuted weights' above importance weights'",
        "decile",
        "pasmoe-random",
        "pasmoe",
    ),
]


# ---- running it ----


def run_name(cfg: config.RunConfig, overrides: dict) -> str:
    extra = "".join(f"_{k}{v if isinstance(v, str) else f'{v:g}'}" for k, v in overrides.items() if k not in NAMED)
    return f"{cfg.method}_order{cfg.order}_E{cfg.num_experts}_la{cfg.lambda_a:g}{extra}_s{cfg.seed}"


def planned(base: config.RunConfig, method: str, seed: int, overrides: dict) -> config.RunConfig:
    """The config of one planned run: the shared settings, the method with its own flags' defaults, the overrides."""
    own = METHODS[method].flags
    method_args = {k: overrides.get(k, f.default) for k, f in own.items()}
    return dataclasses.replace(
        base, method=method, seed=seed, method_args=method_args, **{k: v for k, v in overrides.items() if k not in own}
    )


def run_study(base: config.RunConfig, out_dir: Path, parts: list[str]) -> None:
    """Every run of these parts on top of `base`: finished runs are reused, broken ones resumed,
    and a run that another study process holds (its lock file) is left to it, unless that
    process, on this host, is gone."""
    fields = [f.name for f in dataclasses.fields(config.RunConfig) if f.name != "out"]
    for part in parts:
        variants, seeds = PLAN[part]
        for method, overrides in variants:
            for seed in range(seeds):
                cfg = planned(base, method, seed, overrides)
                name = run_name(cfg, overrides)
                cfg.out = str(out_dir / "runs" / name)
                run_dir, lock = Path(cfg.out), out_dir / "runs" / f".{name}.lock"
                if (run_dir / "config.json").exists():
                    saved = json.loads((run_dir / "config.json").read_text())
                    differ = [
                        f"{k}: {saved.get(k)!r} vs {getattr(cfg, k)!r}"
                        for k in fields
                        if saved.get(k) != getattr(cfg, k)
                    ]
                    if differ:
                        raise ValueError(
                            f"{run_dir} was made with other settings ({'; '.join(differ)}): use another directory"
                        )
                    if (run_dir / "metrics.json").exists():
                        continue
                lock.parent.mkdir(parents=True, exist_ok=True)
                if not take_lock(lock):
                    print(f"[{part}] {name}: another study process holds {lock} (delete it if none does)")
                    continue
                try:
                    print(f"[{part}] {name}")
                    train_stream.run(cfg, resume=run_dir.exists())
                finally:
                    lock.unlink()


def plan_problems(base: config.RunConfig, parts: list[str]) -> list[str]:
    """What a planned run's settings would refuse (train_stream.py's checks), found before the first run starts."""
    found = {}
    for part in parts:
        variants, _ = PLAN[part]
        for method, overrides in variants:
            cfg = dataclasses.replace(planned(base, method, 0, overrides), out="/nonexistent/run")
            flags = config.dataclass_flags(config.RunConfig)[0] | METHODS[method].flags
            for problem in config.settings_problems(cfg, {}, flags):
                found.setdefault(problem, f"[{part}] {method}: {problem}")
    return list(found.values())


def take_lock(lock: Path) -> bool:
    """Create `lock` holding this process's host and pid. A lock whose process, on this host, is
    gone (a killed study) is taken over; one of a live process, or of another host, is not."""
    try:
        with lock.open("x") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        return True
    except FileExistsError:
        host, _, pid = lock.read_text().partition(" ")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            return False
        print(f"{lock}: its process {pid} is gone; taking the run over")
        lock.unlink(missing_ok=True)
        return take_lock(lock)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


# ---- reading it ----


DEFAULTS = {
    "mixture_scale": "matched",
    "num_experts": 6,
    "lambda_a": config.RunConfig.lambda_a,
    "replay_fraction": METHODS["replay"].flags["replay_fraction"].default,
    "temperature": config.RunConfig.temperature,
}  # the main comparison's settings
BEFORE = {"mixture_scale": "paper"}  # what runs saved before a setting existed used


def select(runs: list[dict], method: str | None = None, **want) -> list[dict]:
    """Runs of a method (any, if None) whose config has the wanted values, and DEFAULTS otherwise. A setting
    that a run's method does not have (replay_fraction, outside replay) counts as its default."""
    want = DEFAULTS | want
    return sorted(
        (
            r
            for r in runs
            if (method is None or r["method"] == method)
            and all(r["config"].get(k, BEFORE.get(k, DEFAULTS.get(k))) == v for k, v in want.items())
        ),
        key=lambda r: r["config"]["seed"],
    )


def _value(run: dict, what: str) -> float | None:
    """One quantity of one run: AP or BWT, or from its analyses (None where it has none)."""
    if what in ("ap", "bwt"):
        return run["metrics"][what]
    if "analyses" not in run:  # computed once per run, however many tables ask
        run["analyses"] = analyses.analyses(run)
    found = run["analyses"]
    if what == "drift":
        return found["router_drift"]["mean"] if "router_drift" in found else None
    if what == "top10":
        return 100 * found["importance"]["top10_share"] if "importance" in found else None
    key = "updates_B" if what == "decile_B" else "updates"
    ratio = found[key]["top_over_bottom"] if key in found else None  # most / least important decile
    return None if not ratio else 1 / ratio - 1 if what == "decile_gap" else ratio


def _values(runs: list[dict], what: str) -> dict[int, float]:
    """{seed: value} of one quantity over runs of one method."""
    return {r["config"]["seed"]: v for r in runs if (v := _value(r, what)) is not None}


def _cells(values: list[float], digits: int = 1) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def calibration(runs: list[dict]) -> str:
    """Per order: every seed's AP, BWT and lowest just-trained score of the reference methods, and
    whether each criterion of CALIBRATION holds in every seed."""
    return _calibration(runs)[0]


def calibrated_orders(runs: list[dict]) -> set[str]:
    """The orders on which every criterion of CALIBRATION holds (the reference runs among `runs`)."""
    return _calibration(_references(runs))[1]


def _references(runs: list[dict]) -> list[dict]:
    """The runs of the reference methods at the main comparison's settings."""
    return [r for r in select(runs) if r["method"] in REFERENCES]


def _criteria(ap: dict, low: dict, seq_bwt: list) -> list[tuple[bool, str]]:
    """CALIBRATION's four criteria on one order: (holds, the numbers behind it) each."""
    c, gap = CALIBRATION, statistics.mean(ap["replay"]) - statistics.mean(ap["seqlora"])
    lows = [v for m in REFERENCES for v in low[m]]
    return [
        (min(lows) >= c["learned"], f"lowest {min(lows):.1f}"),
        (min(ap["joint"]) >= c["joint_ap"], f"lowest {min(ap['joint']):.1f}"),
        (
            all(c["seqlora_bwt"][0] <= b <= c["seqlora_bwt"][1] for b in seq_bwt),
            f"{min(seq_bwt):.1f} to {max(seq_bwt):.1f}",
        ),
        (
            gap >= c["replay_gap"] and min(ap["replay"]) > max(ap["seqlora"]),
            f"+{gap:.1f}, replay lowest {min(ap['replay']):.1f}, seqlora highest {max(ap['seqlora']):.1f}",
        ),
    ]


def _calibration(runs: list[dict]) -> tuple[str, set[str]]:
    c = CALIBRATION
    rows = [
        "| order | method | seeds | AP, each seed | AP mean | BWT, each seed | lowest just-trained |",
        "|---|---|---|---|---|---|---|",
    ]
    passed = set()
    checks = [
        f"| order | every task learned (≥ {c['learned']:g}) | joint AP ≥ {c['joint_ap']:g} | seqlora BWT in "
        f"[{c['seqlora_bwt'][0]:g}, {c['seqlora_bwt'][1]:g}] | replay AP ≥ seqlora AP + {c['replay_gap']:g}, ranges "
        f"apart | all |",
        "|---|---|---|---|---|---|",
    ]
    for order in sorted({r["config"]["order"] for r in runs if r["method"] in REFERENCES}):
        by = {m: select(runs, m, order=order) for m in REFERENCES}
        ap = {m: [r["metrics"]["ap"] for r in rs] for m, rs in by.items()}
        low = {m: [min(just_trained(r["R"])) for r in rs] for m, rs in by.items()}
        for m, rs in by.items():
            bwt = [r["metrics"]["bwt"] for r in rs if r["metrics"]["bwt"] is not None]
            if rs:
                rows.append(
                    f"| {order} | {m} | {len(rs)} | {_cells(ap[m])} | {statistics.mean(ap[m]):.1f} | "
                    f"{_cells(bwt) or '-'} | {min(low[m]):.1f} |"
                )
        if not all(by.values()):
            checks.append(
                f"| {order} | incomplete: needs runs of {', '.join(m for m in REFERENCES if not by[m])} | | | | |"
            )
            continue
        verdicts = _criteria(ap, low, [r["metrics"]["bwt"] for r in by["seqlora"]])
        cells = [("yes" if ok else "**NO**") + f" ({why})" for ok, why in verdicts]
        checks.append(
            f"| {order} | " + " | ".join(cells) + f" | {'yes' if all(ok for ok, _ in verdicts) else '**NO**'} |"
        )
        if all(ok for ok, _ in verdicts):
            passed.add(order)
    return "\n".join(rows) + "\n\n" + "\n".join(checks) + "\n", passed


def verdict(mean: float, low: float, high: float, digits: int = 2) -> str:
    """The rule fixed before the runs: supported if the interval excludes 0 in the claimed
    (positive) direction, contradicted if it excludes 0 in the other, else not resolved (with the
    interval's half-width, to `digits` decimals)."""
    return "supported" if low > 0 else "contradicted" if high < 0 else f"not resolved (±{(high - low) / 2:.{digits}f})"


def _paired(runs: list[dict], metric: str, a: str, b, order: str, scale: str) -> dict[int, float]:
    """A claim's difference a − b in `metric`, seed by seed, on one order and scale (b: a method, or
    a number that every seed of a is compared with)."""
    va = _values(select(runs, a, order=order, mixture_scale=scale), metric)
    vb = (
        _values(select(runs, b, order=order, mixture_scale=scale), metric) if isinstance(b, str) else {s: b for s in va}
    )
    return {s: va[s] - vb[s] for s in sorted(set(va) & set(vb))}


def _interval(diffs: dict[int, float], digits: int) -> tuple[str, tuple[float, float, float]]:
    """'mean [low, high]' of the paired differences, and the three numbers."""
    mean, low, high = mean_interval(list(diffs.values()))  # the differences are already paired by seed
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]", (mean, low, high)


def claims(
    runs: list[dict], calibrated: set[str] | None = None, planned: int = PLAN["claims"][1], scale: str = "matched"
) -> str:
    """Each claim on orders A and B: every seed's difference, its mean and 95% paired t-interval, and
    the verdict, given only on the orders that pass the calibration (`calibrated`: from the runs)
    and only once all `planned` seeds are in (no interval is shown before: no peeking). scale: the
    mixture's scale convention of the runs compared (config.RunConfig.mixture_scale)."""
    calibrated = calibrated_orders(runs) if calibrated is None else calibrated
    rows = [
        "| claim | what | order | seeds | a − b, each seed | mean [95% interval] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, what, metric, a, b in CLAIMS:
        digits = 4 if metric == "drift" else 2
        for order in ("A", "B"):
            diffs = _paired(runs, metric, a, b, order, scale)
            if len(diffs) < planned:
                rows.append(
                    f"| {claim} | {what} | {order} | {len(diffs)} | | | waiting ({len(diffs)} of {planned} seeds) |"
                )
                continue
            shown, interval = _interval(diffs, digits)
            judged = (
                verdict(*interval, digits) if order in calibrated else f"not judged (order {order} is not calibrated)"
            )
            each = _cells(list(diffs.values()), digits)
            rows.append(f"| {claim} | {what} | {order} | {len(diffs)} | {each} | {shown} | {judged} |")
    return "\n".join(rows) + "\n"


def verdicts(runs: list[dict], calibrated: set[str], planned: int = PLAN["claims"][1]) -> str:
    """Both regimes of the mixture's scale side by side: each claim's mean [95% interval] and verdict,
    on each calibrated order of A and B (claims() has every seed)."""
    rows = [
        "| claim | what | order | scale-matched (the default) | the paper's scale |",
        "|---|---|---|---|---|",
    ]
    for claim, what, metric, a, b in CLAIMS:
        digits = 4 if metric == "drift" else 2
        for order in sorted(calibrated & {"A", "B"}):
            cells = []
            for scale in ("matched", "paper"):
                diffs = _paired(runs, metric, a, b, order, scale)
                if len(diffs) < planned:
                    cells.append(f"waiting ({len(diffs)} of {planned} seeds)")
                    continue
                shown, interval = _interval(diffs, digits)
                cells.append(f"{shown} {verdict(*interval, digits)}")
            rows.append(f"| {claim} | {what} | {order} | {cells[0]} | {cells[1]} |")
    uncalibrated = sorted({"A", "B"} - calibrated)
    note = f"\nOrder {', '.join(uncalibrated)} failed its calibration: not judged (every seed: the tables below).\n"
    return "\n".join(rows) + "\n" + (note if uncalibrated else "")


def _shown(values: list[float], digits: int = 1) -> str:
    """'mean [low, high]' over seeds (95% t-interval), the value alone for one seed, '-' for none."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    mean, low, high = mean_interval(values)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def per_seed(runs: list[dict], methods, order: str, metric: str = "ap") -> str:
    """Every seed's value of a metric per method, with the mean and a 95% t-interval of the mean."""
    rows = [f"| method | seeds | {metric.upper()}, each seed | mean [95% interval] |", "|---|---|---|---|"]
    for m in methods:
        values = list(_values(select(runs, m, order=order), metric).values())
        if len(values) > 1:
            mean, low, high = mean_interval(values)
            rows.append(f"| {m} | {len(values)} | {_cells(values)} | {mean:.1f} [{low:.1f}, {high:.1f}] |")
        elif values:
            rows.append(f"| {m} | 1 | {values[0]:.1f} | {values[0]:.1f} |")
    return "\n".join(rows) + "\n"


def regimes(runs: list[dict], order: str = "A") -> str:
    """The claims' methods at both scales of the mixture: what each learned (the mean and the lowest
    score right after a task's own training), kept (AP, BWT) and how far its gate drifted; means over
    seeds with a 95% interval where there are several."""

    rows = [
        "| method | scale | seeds | AP | BWT | mean just-trained | lowest just-trained | router drift (JS bits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in CLAIM_METHODS:
        for scale in ("matched", "paper"):
            chosen = select(runs, method, order=order, mixture_scale=scale)
            if chosen:
                diagonal = [just_trained(r["R"]) for r in chosen]
                cells = [
                    _shown([r["metrics"]["ap"] for r in chosen]),
                    _shown([r["metrics"]["bwt"] for r in chosen]),
                    _shown([sum(d) / len(d) for d in diagonal]),
                    f"{min(min(d) for d in diagonal):.1f}",
                    _shown(list(_values(chosen, "drift").values()), 4),
                ]
                rows.append(f"| {method} | {scale} | {len(chosen)} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


# The paper's AP and BWT (LLaVA-1.5-7B on MLLM-CTBench, order A), by our method names: Table 1,
# except pas-rw (Table 2) and pasmoe-random (Table 7). Printed beside ours, never mixed with them.
PAPER_AP_BWT = {
    "seqft": ("SeqFT", 36.39, -15.27),
    "seqlora": ("SeqLoRA", 28.24, -22.09),
    "replay": ("Replay", 42.05, -8.29),
    "ewc": ("EWC", 30.19, -20.20),
    "lwf": ("LwF", 30.20, -19.96),
    "mas": ("MAS", 30.34, -19.36),
    "l2p": ("L2P", 31.65, -14.97),
    "olora": ("O-LoRA", 32.52, -19.46),
    "hide": ("HiDe-LLaVA", 24.63, -16.16),
    "ddas": ("DDAS", 37.49, -4.06),
    "moelora-topk": ("MoELoRA (Top-k)", 32.38, -15.34),
    "moelora": ("MoELoRA (Softmax)", 43.36, -6.64),
    "pas-rw": ("+ PASs-RW (Table 2)", 46.31, -4.24),
    "pasmoe-random": ("random reg. (Table 7)", 45.12, -4.90),
    "pasmoe": ("Ours", 48.46, -2.15),
}


def paper_comparison(runs: list[dict]) -> str:
    """Our AP and BWT (mean and 95% interval over seeds) beside the paper's, one row per method,
    sorted by our AP. Different model and data: compare orderings, not values."""
    rows = [
        "| method | seeds | our AP | our BWT | paper's row | paper AP | paper BWT |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)

    for method in sorted(by, key=lambda m: statistics.mean(r["metrics"]["ap"] for r in by[m])):
        rs = by[method]
        name, ap, bwt = PAPER_AP_BWT.get(method, ("not in the paper", None, None))
        ours = [_shown([r["metrics"][k] for r in rs if r["metrics"][k] is not None]) for k in ("ap", "bwt")]
        paper = f"{ap:.2f} | {bwt:.2f}" if ap is not None else "- | -"
        rows.append(f"| {method} | {len(rs)} | {ours[0]} | {ours[1]} | {name} | {paper} |")
    return "\n".join(rows) + "\n"


def task_identification(runs: list[dict]) -> str:
    """For methods that pick an expert by identifying the task (HiDe-LLaVA, DDAS): how often the
    pick is right on each task's test items, per seed (metrics.json, "task_id_accuracy")."""
    rows = [
        "| method | seed | " + " | ".join(runs[0]["tasks"]) + " | mean |",
        "|---|---|" + "---|" * (len(runs[0]["tasks"]) + 1),
    ]
    for r in runs:
        acc = r["metrics"].get("task_id_accuracy")
        if acc:
            cells = [f"{acc[k]:.1f}" if acc.get(k) is not None else "-" for k in r["tasks"]]
            rows.append(
                f"| {r['method']} | {r['config']['seed']} | "
                + " | ".join(cells)
                + f" | {statistics.mean(acc.values()):.1f} |"
            )
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def lambda_frontier(runs: list[dict]) -> tuple[str, dict]:
    """Per weighting and strength (x the paper's lambdas; 0 is pas-rw): every seed's BWT, and the
    means of BWT, AP and the mean just-trained score (plasticity)."""
    rows = [
        "| weighting | λ factor | seeds | BWT, each seed | BWT | AP | mean just-trained |",
        "|---|---|---|---|---|---|---|",
    ]
    curves = {}
    for m in WEIGHTINGS:
        curve = []
        for factor in (0, 1, *LAMBDA_FACTORS):
            rs = (
                select(runs, "pas-rw", order="A")
                if factor == 0
                else select(runs, m, order="A", lambda_a=factor * config.RunConfig.lambda_a)
            )
            if not rs:
                continue
            bwt, ap = [r["metrics"]["bwt"] for r in rs], [r["metrics"]["ap"] for r in rs]
            plastic = [statistics.mean(just_trained(r["R"])) for r in rs]
            rows.append(
                f"| {m} | {factor:g} | {len(rs)} | {_cells(bwt)} | {statistics.mean(bwt):.1f} | "
                f"{statistics.mean(ap):.1f} | {statistics.mean(plastic):.1f} |"
            )
            curve.append((factor, statistics.mean(bwt), statistics.mean(ap), statistics.mean(plastic)))
        curves[m] = curve
    return "\n".join(rows) + "\n", curves


def experts(runs: list[dict]) -> str:
    rows = ["| E | method | seeds | AP, each seed | AP | BWT |", "|---|---|---|---|---|---|"]
    for E in (2, 4, 6, 8):
        for m in ("moelora", "pasmoe"):
            rs = select(runs, m, order="A", num_experts=E)
            if rs:
                ap, bwt = [r["metrics"]["ap"] for r in rs], [r["metrics"]["bwt"] for r in rs]
                rows.append(
                    f"| {E} | {m} | {len(rs)} | {_cells(ap)} | {statistics.mean(ap):.1f} | {statistics.mean(bwt):.1f} |"
                )
    return "\n".join(rows) + "\n"


def mechanisms(runs: list[dict]) -> str:
    """Router drift, importance concentration and update size by importance decile (A rows and
    B columns), per method on order A: mean and 95% interval over seeds."""
    rows = [
        "| method | seeds | router drift (JS bits) | top-10% importance share (%) | A rows: most / least important "
        "decile update | B columns: the same |",
        "|---|---|---|---|---|---|",
    ]
    for m in CLAIM_METHODS:
        rs = select(runs, m, order="A")
        if not rs:
            continue
        cells = []
        for key, digits in (("drift", 4), ("top10", 1), ("decile", 2), ("decile_B", 2)):
            values = list(_values(rs, key).values()) if m != "pas-rw" or not key.startswith("decile") else []
            if len(values) > 1:
                mean, low, high = mean_interval(values)
                cells.append(f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]")
            else:
                cells.append("-")
        rows.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def learnability(runs: list[dict], bar: float = 70.0) -> str:
    """Per task: mean and minimum of R[t][t] over runs, and how many fall below `bar`."""
    lines = [f"| task | mean R[t][t] | min | runs below {bar:g} |", "|---|---|---|---|"]
    for t, key in enumerate(runs[0]["tasks"]):
        diag = [just_trained(r["R"])[t] for r in runs]
        lines.append(
            f"| {key} | {statistics.mean(diag):.1f} | {min(diag):.1f} | {sum(v < bar for v in diag)} of {len(diag)} |"
        )
    return "\n".join(lines) + "\n"


LESSON = [  # (exercise, what, method, overrides, quantity): the outcomes LESSON.md quotes, over every seed run
    ("1", "seqlora: lowest score right after a task's training", "seqlora", {}, "lowest_diag"),
    ("1", "seqlora AP", "seqlora", {}, "ap"),
    ("1", "seqlora BWT", "seqlora", {}, "bwt"),
    *[("1", f"seqlora: points of {t} forgotten", "seqlora", {}, f"forgot:{t}") for t in ("numglue", "art", "OCR")],
    ("2", "joint AP", "joint", {}, "ap"),
    *[
        ("3", f"replay {f} {m.upper()}", "replay", {"replay_fraction": f}, m)
        for f in (0.02, 0.1, 0.3)
        for m in ("ap", "bwt")
    ],
    ("4", "ewc AP", "ewc", {}, "ap"),
    ("4", "ewc BWT", "ewc", {}, "bwt"),
    ("4", "ewc: fomc right after its training", "ewc", {}, "diag:fomc"),
    ("4", "seqlora: fomc right after its training", "seqlora", {}, "diag:fomc"),
    ("4", "mas AP", "mas", {}, "ap"),
    ("4", "mas BWT", "mas", {}, "bwt"),
    ("4", "l2 AP", "l2", {}, "ap"),
    ("4", "l2 BWT", "l2", {}, "bwt"),
    *[("5", f"router drift, {m}", m, {}, "drift") for m in ("moelora-topk", "moelora", "pas-rw", "pasmoe")],
    ("6", "pasmoe top-10% importance share (%)", "pasmoe", {}, "top10"),
    *[("6", f"A rows most / least important decile, {m}", m, {}, "decile") for m in ("pasmoe", "pasmoe-random", "l2")],
    *[("6", f"{m} AP", m, {}, "ap") for m in ("pasmoe", "pasmoe-random")],
    *[
        ("8", f"pasmoe tau {tau} {m.upper()}", "pasmoe", {"temperature": tau}, m)
        for tau in (0.25, 1.0)
        for m in ("ap", "bwt")
    ],
]
# What LESSON.md says holds, as comparisons a > b made seed by seed (b: another quantity, or a number). Fixed
# before the scale-matched study's runs; tests/test_lesson.py checks that LESSON.md quotes each as holding in
# every seed, so a statement the seeds do not bear out cannot stay in the lesson.
STATEMENTS = [  # (exercise, statement, a, b); a and b: (method, overrides, quantity) or a number
    ("1", "seqlora forgets numglue", ("seqlora", {}, "forgot:numglue"), 0.0),
    ("1", "seqlora learns every task to 70 or more", ("seqlora", {}, "lowest_diag"), 70.0),
    ("2", "joint training beats sequential fine-tuning", ("joint", {}, "ap"), ("seqlora", {}, "ap")),
    (
        "3",
        "a 30% buffer forgets less than a 2% one",
        ("replay", {"replay_fraction": 0.3}, "bwt"),
        ("replay", {"replay_fraction": 0.02}, "bwt"),
    ),
    ("4", "EWC forgets less than sequential fine-tuning", ("ewc", {}, "bwt"), ("seqlora", {}, "bwt")),
    (
        "4",
        "EWC learns fomc less well than sequential fine-tuning",
        ("seqlora", {}, "diag:fomc"),
        ("ewc", {}, "diag:fomc"),
    ),
    ("5", "top-k routing drifts more than the softmax router", ("moelora-topk", {}, "drift"), ("moelora", {}, "drift")),
    ("6", "importance concentrates: the top 10% of directions hold more than 10%", ("pasmoe", {}, "top10"), 10.0),
    (
        "6",
        "the penalty moves the most important A rows less than the least important",
        (1.0,),
        ("pasmoe", {}, "decile"),
    ),
    (
        "6",
        "permuted weights do not: their ratio is above the importance weights'",
        ("pasmoe-random", {}, "decile"),
        ("pasmoe", {}, "decile"),
    ),
]


# What each quantity can take: a prediction interval is cut to it (a score above 100 is no prediction).
# forgot and bwt, differences of two scores, take [-100, 100] (the default).
BOUNDS = {
    "ap": (0, 100),
    "lowest_diag": (0, 100),
    "diag": (0, 100),
    "top10": (0, 100),
    "drift": (0, 1),
    "decile": (0, math.inf),
}


def _lesson_value(run: dict, quantity: str) -> float | None:
    """lowest_diag: the lowest score right after a task's own training; diag:TASK: that score of one
    task; forgot:TASK: how far that task fell from it by the end; else as `_value`."""
    kind, _, task = quantity.partition(":")
    if not task:
        return min(just_trained(run["R"])) if kind == "lowest_diag" else _value(run, kind)
    if task not in run["tasks"]:
        return None
    t = run["tasks"].index(task)
    return run["R"][t][t] - (run["R"][-1][t] if kind == "forgot" else 0.0)


def _lesson_values(runs: list[dict], what) -> dict[int, float]:
    """{seed: value} on order A of (method, overrides, quantity); a number stands for itself."""
    if len(what) == 1:
        return {"any": what[0]}
    method, overrides, quantity = what
    return {
        r["config"]["seed"]: v
        for r in select(runs, method, order="A", **overrides)
        if (v := _lesson_value(r, quantity)) is not None
    }


def lesson(runs: list[dict], only: str | None = None) -> str:
    """The outcomes LESSON.md quotes (order A): over every seed run, the range, and the 95% prediction
    interval for one more seed (where a newcomer's run, on any machine, should land); then the lesson's
    statements, each with the seeds in which it holds. only: one exercise's rows (shown under it)."""
    rows = ["| exercise | what | seeds | range over the seeds | a new seed: 95% |", "|---|---|---|---|---|"]
    for exercise, what, method, overrides, quantity in LESSON:
        if only not in (None, exercise):
            continue
        values = list(_lesson_values(runs, (method, overrides, quantity)).values())
        if len(values) > 1:
            digits = 3 if quantity == "drift" else 2 if quantity == "decile" else 1
            low, high = prediction_interval(values, bounds=BOUNDS.get(quantity.partition(":")[0], (-100, 100)))
            rows.append(
                f"| {exercise} | {what} | {len(values)} | {min(values):.{digits}f} to {max(values):.{digits}f} | "
                f"{low:.{digits}f} to {high:.{digits}f} |"
            )
    statements = [row for row in STATEMENTS if only in (None, row[0])]
    rows += ["", "| exercise | statement (a > b, seed by seed) | holds in |", "|---|---|---|"] if statements else []
    for exercise, statement, a, b in statements:
        va = _lesson_values(runs, a if isinstance(a, tuple) else (a,))
        vb = _lesson_values(runs, b if isinstance(b, tuple) else (b,))
        seeds = sorted(vb) if "any" in va else sorted(va) if "any" in vb else sorted(set(va) & set(vb))
        holds = sum(va.get(s, va.get("any")) > vb.get(s, vb.get("any")) for s in seeds)
        rows.append(f"| {exercise} | {statement} | {holds} of {len(seeds)} seeds |")
    return "\n".join(rows) + "\n"


def learnability_check(runs: list[dict], calibrated: set[str]) -> str:
    """LEARNABILITY, on every calibrated order: each seed's lowest score right after a task's own training,
    for the claims' methods in the regime where the claims are judged; MoELoRA's decides."""
    rows = ["| order | method | seeds | lowest just-trained, each seed | every task learned |", "|---|---|---|---|---|"]
    for order in sorted(calibrated):
        for method in CLAIM_METHODS:
            lows = [min(just_trained(r["R"])) for r in select(runs, method, order=order)]
            if lows:
                ok = (
                    "yes"
                    if min(lows) >= LEARNABILITY["learned"]
                    else f"**NO** ({sum(v < LEARNABILITY['learned'] for v in lows)} below)"
                )
                rows.append(
                    f"| {order} | {method}{' (decides)' if method == LEARNABILITY['method'] else ''} | {len(lows)} "
                    f"| {_cells(lows)} | {ok} |"
                )
    return "\n".join(rows) + "\n"


def first_run(runs: list[dict]) -> str:
    """What `python train_stream.py` (pasmoe, order A, the defaults) should print on any machine: the 95%
    prediction interval of AP and BWT for one more seed, from the study's seeds (per-seed values are not
    portable across CPUs; their distribution is)."""
    rs = select(runs, "pasmoe", order="A")
    if len(rs) < 2:
        return ""
    cells = []
    for metric in ("ap", "bwt"):
        values = [r["metrics"][metric] for r in rs]
        low, high = prediction_interval(values, bounds=BOUNDS.get(metric, (-100, 100)))
        cells.append(
            f"{metric.upper()} {low:.1f} to {high:.1f} (the study's {len(values)} seeds: {min(values):.1f} to "
            f"{max(values):.1f})"
        )
    return "; ".join(cells) + "\n"


def _frontier_figure(study_dir: Path, curves: dict, refs: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, idx, label in ((axes[0], 2, "final AP"), (axes[1], 3, "mean just-trained score (plasticity)")):
        for m, curve in curves.items():
            ax.plot([p[1] for p in curve], [p[idx] for p in curve], marker="o", label=m)
            for p in curve:
                ax.annotate(f"{p[0]:g}", (p[1], p[idx]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        for m in ("seqlora", "replay"):
            rs = [r for r in refs if r["method"] == m]
            if rs:
                y = [r["metrics"]["ap"] if idx == 2 else statistics.mean(just_trained(r["R"])) for r in rs]
                ax.scatter(
                    [statistics.mean(r["metrics"]["bwt"] for r in rs)], [statistics.mean(y)], marker="s", label=m
                )
        joint = [r["metrics"]["ap"] for r in refs if r["method"] == "joint"]
        if joint and idx == 2:
            ax.axhline(statistics.mean(joint), color="grey", ls="--", lw=1, label="joint (upper bound)")
        ax.set(xlabel="BWT (paper convention; 0 = no forgetting)", ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle("stability-plasticity frontier: labels are λ factors (× the paper's λ_A, λ_B)", fontsize=9)
    fig.tight_layout()
    path = study_dir / "figures" / "frontier.png"
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def claim_tables(runs: list[dict], calibrated: set[str]) -> dict[str, tuple[str, str]]:
    """The claims in both regimes of the mixture's scale, and the learnability criterion, by table name."""
    return {
        "verdicts": (
            "The claims' verdicts in both regimes of the mixture's scale (10 paired seeds; mean a − b [95% interval])",
            verdicts(runs, calibrated),
        ),
        "claims": (
            "The paper's claims, scale-matched experts (the default): paired differences over seeds, and the verdicts",
            claims(runs, calibrated),
        ),
        "claims-paper": (
            "The paper's claims, experts at the paper's scale (alpha / r per expert)",
            claims(runs, calibrated, scale="paper"),
        ),
        "regimes": (
            "The claims' methods at both scales of the mixture, order A (what changes between the regimes)",
            regimes(runs),
        ),
        "learnability-check": (
            "Learnability of the claims' methods (criterion: MoELoRA learns every task to 70, every "
            "seed, every calibrated order)",
            learnability_check(runs, calibrated),
        ),
    }


def tables(runs: list[dict], study_dir: Path) -> dict[str, tuple[str, str]]:
    """Every table of the study, by name: {name: (title, markdown)}; also draws the frontier figure."""
    commits = sorted({r["config"].get("commit", "unknown") for r in runs})
    seconds = sum(sum(r["metrics"].get("train_s", [])) + sum(r["metrics"].get("eval_s", [])) for r in runs)
    order_a = select(runs, order="A")
    identified = [r for r in order_a if r["metrics"].get("task_id_accuracy")]
    frontier, curves = lambda_frontier(runs)
    calibrated_text, calibrated = _calibration(_references(runs))  # once: the claims are judged on its orders
    try:
        figure = f"figure: {_frontier_figure(study_dir, curves, [r for r in order_a if r['method'] in REFERENCES])}\n"
    except ImportError:
        figure = "(no frontier figure: pip install matplotlib)\n"
    return {
        "summary": (
            "",
            f"Runs: {len(runs)}; commit(s): {', '.join(commits)}; training and evaluation time summed "
            f"over the runs: {seconds / 3600:.1f} h of process time.\n",
        ),
        "calibration": ("Calibration: the reference methods on every order", calibrated_text),
        **claim_tables(runs, calibrated),
        "first-run": ("", first_run(runs)),
        "seeds-A": ("AP of every seed, order A", per_seed(runs, REFERENCES + CLAIM_METHODS + OTHER_METHODS, "A")),
        "seeds-B": ("AP of every seed, order B", per_seed(runs, REFERENCES + CLAIM_METHODS, "B")),
        "ablation": (
            "Ablation, order A (the paper's Table 1 layout, mean ± std)",
            evaluate.report(order_a) if order_a else "",
        ),
        "paper": (
            "Beside the paper's numbers (theirs: LLaVA-1.5-7B on MLLM-CTBench; ours: the sanity stream, order A)",
            paper_comparison(order_a),
        ),
        "task-id": (
            "Task identification by HiDe-LLaVA and DDAS (% of each task's test items given their own task's expert)",
            task_identification(identified) if identified else "",
        ),
        "mechanisms": ("Mechanisms, order A (paper Fig. 3, 6, 8)", mechanisms(runs)),
        "experts": ("Number of experts, order A (paper Table 3)", experts(runs)),
        "learnability": (
            "Learnability: score right after each task's own training, order A",
            learnability(order_a) if order_a else "",
        ),
        "lesson": ("The outcomes LESSON.md quotes (order A, every seed run)", lesson(runs)),
        "lambda": ("λ frontier, order A (paper Fig. 4, widened)", frontier + "\n" + figure),
    }


def report(study_dir: str | Path) -> dict[str, tuple[str, str]]:
    """Write every table of the study to results.md in the study directory (and print it); return
    the tables by name, and all of them as "all"."""
    study_dir = Path(study_dir)
    runs = [load_run(d) for d in sorted((study_dir / "runs").iterdir()) if (d / "metrics.json").exists()]
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir / 'runs'}")
    found = tables(runs, study_dir)
    text = "\n".join(f"### {title}\n\n{body}" if title else body for title, body in found.values() if body.strip())
    (study_dir / "results.md").write_text(text)
    print(text + f"\nwritten to {study_dir / 'results.md'}")
    exercises = {f"lesson-{e}": ("", lesson(runs, e)) for e in dict.fromkeys(row[0] for row in LESSON)}
    return found | exercises | {"all": ("", text)}


BLOCK = re.compile(r"(<!-- study table: ([\w-]+) -->\n).*?(<!-- end of study table -->)", re.S)


def fill_docs(paths: list[Path], found: dict[str, tuple[str, str]]) -> None:
    """Replace, in each file, every block between `<!-- study table: NAME -->` and
    `<!-- end of study table -->` with the table NAME, as printed; the prose around it is kept."""
    for path in paths:
        text = path.read_text()
        unknown = sorted({m.group(2) for m in BLOCK.finditer(text)} - set(found))
        if unknown:
            raise ValueError(f"{path}: no study table named {', '.join(unknown)} (there are: {', '.join(found)})")
        filled, count = BLOCK.subn(
            lambda m: m.group(1) + (found[m.group(2)][1] or "(no runs yet)\n") + m.group(3), text
        )
        path.write_text(filled)
        print(f"{path}: {count} table(s) filled")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Other flags are train_stream.py's: the settings every run shares."
    )
    parser.add_argument("dir", type=Path, help="the study directory (runs/, results.md, figures/)")
    parser.add_argument(
        "--parts", nargs="+", default=list(PLAN), choices=list(PLAN), help="parts to run (default: all)"
    )
    parser.add_argument("--report", action="store_true", help="only write the tables and figures of the finished runs")
    parser.add_argument(
        "--docs",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="also fill each `<!-- study table: NAME -->` block of these files (README.md ...)",
    )
    args, shared = parser.parse_known_args(argv)
    varied = [
        f
        for f in shared
        if f.split("=")[0].lstrip("-").replace("-", "_") in {*DEFAULTS, "order", "lambda_b", "method", "seed"}
    ]
    if varied:
        parser.error(f"the study sets {', '.join(varied)} itself (its plan varies them, and its tables select by them)")
    if not args.report:
        if {"--out", "--resume", "--dry-run"} & {f.split("=")[0] for f in shared}:
            parser.error(
                "the study chooses each run's --method, --seed and --out itself; --resume and --dry-run do not apply"
            )
        base, _ = config.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in SHARED.items()] + shared)
        if problems := plan_problems(base, args.parts):
            parser.error("; ".join(problems))
        run_study(base, args.dir, args.parts)
    fill_docs(args.docs, report(args.dir))


if __name__ == "__main__":
    main(sys.argv[1:])
