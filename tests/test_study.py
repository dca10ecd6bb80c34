"""lab/study.py's tables and verdicts, and lab/stats.py's intervals, on hand-built run directories
and on simulated seeds."""

import json
import random
import statistics

import pytest

from evaluate import load_run
from lab import study
from lab.stats import paired_difference, prediction_interval, t_quantile

DEFAULT_LA = 5e-4


def write_run(path, method, seed, R, order="A", tasks=("x", "y"), **config):
    path.mkdir(parents=True)
    (path / "matrix.json").write_text(json.dumps({"tasks": list(tasks), "R": R}))
    (path / "config.json").write_text(
        json.dumps({"method": method, "seed": seed, "order": order} | study.DEFAULTS | config)
    )
    return load_run(path)


# ---- paired comparisons ----


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (4, 2.776445), (9, 2.262157), (19, 2.093024)])
def test_t_quantiles_match_the_tables(df, expected):
    # planted bug: the normal quantile 1.96 in place of Student's t (too narrow at few seeds)
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-5)


def coverage(covered, seed: int, trials: int = 3000) -> float:
    """The share of `trials` simulated sets whose interval covers what it should (covered(rng) -> bool);
    3000 sets: a binomial SE of 0.4 points around 95%."""
    rng = random.Random(seed)
    return sum(covered(rng) for _ in range(trials)) / trials


@pytest.mark.parametrize("n", [5, 10, 20])
def test_paired_interval_has_its_coverage_at_5_to_20_seeds(n):
    # planted bugs: z instead of t (covers ~88% at n = 5), sd / n instead of sd / sqrt(n)
    def covered(rng):
        a = [rng.gauss(2.0, 1.0) for _ in range(n)]
        b = [x - rng.gauss(0.7, 1.5) for x in a]  # a - b ~ N(0.7, 1.5)
        _, low, high = paired_difference(a, b)
        return low <= 0.7 <= high

    assert 0.935 <= coverage(covered, seed=n) <= 0.965


@pytest.mark.parametrize("n", [3, 5, 10])
def test_a_new_seed_falls_in_the_prediction_interval_95_times_in_100(n):
    # planted bugs: the confidence interval of the mean (sd / sqrt(n): covers a new draw ~65% at n = 5),
    # z instead of t, the sqrt(1 + 1/n) factor left out
    def covered(rng):
        low, high = prediction_interval([rng.gauss(80.0, 4.0) for _ in range(n)])
        return low <= rng.gauss(80.0, 4.0) <= high

    assert 0.935 <= coverage(covered, seed=n) <= 0.965
    assert prediction_interval([98.0, 99.0, 100.0], bounds=(0, 100))[1] == 100  # a score stays a score


def test_pairing_narrows_the_interval_when_seeds_are_correlated():
    # planted bug: an unpaired (two-sample) interval, which keeps each seed's own effect
    rng = random.Random(1)
    seed_effect = [rng.gauss(0, 5.0) for _ in range(10)]  # data and initialization move both methods
    a = [s + 1.0 + rng.gauss(0, 0.5) for s in seed_effect]
    b = [s + rng.gauss(0, 0.5) for s in seed_effect]
    _, low, high = paired_difference(a, b)
    unpaired = t_quantile(0.975, 18) * (statistics.variance(a) / 10 + statistics.variance(b) / 10) ** 0.5
    assert low > 0 and (high - low) / 2 < unpaired / 4


def test_verdicts_follow_the_rule_written_before_the_runs():
    assert study.verdict(2.0, 0.5, 3.5) == "supported"
    assert study.verdict(-2.0, -3.5, -0.5) == "contradicted"
    assert study.verdict(0.5, -1.0, 2.0) == "not resolved (±1.50)"
    assert study.verdict(0.0084, -0.0004, 0.0172, digits=4) == "not resolved (±0.0088)"  # drift: in its own digits


def test_claims_pair_runs_by_seed(tmp_path):
    # planted bugs: differences taken between different seeds (sorted by value), a claim read in
    # the wrong direction, or a verdict (or interval) shown before every planned seed is in
    runs = []
    for seed, (pas, moe) in enumerate([(80, 70), (90, 82), (70, 61), (60, 52)]):
        runs.append(write_run(tmp_path / f"p{seed}", "pasmoe", seed, [[pas, None], [pas, pas]]))
        runs.append(write_run(tmp_path / f"m{seed}", "moelora", seed, [[moe, None], [moe, moe]]))
    rows = [
        line
        for line in study.claims(runs, calibrated={"A"}, planned=4).splitlines()
        if "full method above MoELoRA" in line and "| A |" in line
    ]
    assert "not judged (order A is not calibrated)" in study.claims(
        runs, calibrated=set(), planned=4
    )  # calibrated orders only
    early = [
        line
        for line in study.claims(runs, calibrated={"A"}, planned=5).splitlines()
        if "full method above MoELoRA" in line and "| A |" in line
    ]
    assert early[0].endswith("| 4 | | | waiting (4 of 5 seeds) |")
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[3] == "4" and cells[4] == "10.00 8.00 9.00 8.00" and cells[6] == "supported"
    mean, low, high = paired_difference([80, 90, 70, 60], [70, 82, 61, 52])
    assert cells[5] == f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def test_verdicts_put_each_regime_in_its_own_column(tmp_path):
    # planted bugs: the paper's column read from the scale-matched runs (or the two swapped), or an
    # order that failed its calibration judged anyway
    runs = []
    for seed, (pas, moe) in enumerate([(80, 70), (90, 82), (70, 61), (60, 52)]):
        for scale, (a, b) in (("matched", (pas, moe)), ("paper", (moe, pas))):
            runs.append(
                write_run(tmp_path / f"p{seed}{scale}", "pasmoe", seed, [[a]], tasks=("x",), mixture_scale=scale)
            )
            runs.append(
                write_run(tmp_path / f"m{seed}{scale}", "moelora", seed, [[b]], tasks=("x",), mixture_scale=scale)
            )
    table = study.verdicts(runs, calibrated={"A"}, planned=4)
    row = next(line for line in table.splitlines() if "AP: full method above MoELoRA" in line)
    matched, paper = [c.strip() for c in row.split("|")[4:6]]
    assert matched.endswith("supported") and paper.endswith("contradicted")
    assert matched.startswith("+8.75 [") and paper.startswith("-8.75 [")
    assert "| B |" not in table and "Order B failed its calibration" in table


def test_regimes_read_each_scale_from_its_own_runs(tmp_path):
    # planted bugs: the paper-scale row read from the scale-matched runs, or the lowest just-trained
    # score taken from the last row instead of the diagonal
    matched = write_run(tmp_path / "m", "pasmoe", 0, [[90.0, None], [60.0, 80.0]], mixture_scale="matched")
    paper = write_run(tmp_path / "p", "pasmoe", 0, [[50.0, None], [50.0, 70.0]], mixture_scale="paper")
    rows = {row.split("|")[2].strip(): row for row in study.regimes([matched, paper]).splitlines()[2:]}
    assert rows["matched"].startswith("| pasmoe | matched | 1 | 70.0 | -15.0 | 85.0 | 80.0 |")
    assert rows["paper"].startswith("| pasmoe | paper | 1 | 60.0 | 0.0 | 60.0 | 50.0 |")


# ---- the other tables ----


def test_learnability_counts_diagonal_cells_below_the_bar(tmp_path):
    runs = [
        write_run(tmp_path / f"r{i}", "pasmoe", i, R)
        for i, R in enumerate([[[80.0, None], [10.0, 60.0]], [[90.0, None], [10.0, 100.0]]])
    ]
    rows = study.learnability(runs).splitlines()[2:]
    assert rows == ["| x | 85.0 | 80.0 | 0 of 2 |", "| y | 80.0 | 60.0 | 1 of 2 |"]


def calibration_runs(tmp_path, seq, rep, joint, order="A"):
    """Two-task runs of the reference methods: seq and rep are (R[0][0], R[1][0], R[1][1]) per
    seed, joint the final row per seed."""
    runs = []
    for method, rows in (("seqlora", seq), ("replay", rep)):
        for i, (d0, f0, d1) in enumerate(rows):
            runs.append(write_run(tmp_path / f"{method}{order}{i}", method, i, [[d0, None], [f0, d1]], order=order))
    for i, final in enumerate(joint):
        runs.append(write_run(tmp_path / f"joint{order}{i}", "joint", i, [[None, None], final], order=order))
    return runs


def test_calibration_passes_a_calibrated_stream_and_names_each_failure(tmp_path):
    # planted bugs: a criterion checked on the mean instead of every seed, replay ranges that
    # overlap counted as apart, joint's missing diagonal read as 0
    good = calibration_runs(
        tmp_path, seq=[(90, 40, 90), (90, 50, 80)], rep=[(90, 80, 90), (90, 75, 85)], joint=[[90, 85], [85, 90]]
    )
    text = study.calibration(good)
    assert text.splitlines()[-1].endswith("| yes |")  # seqlora BWT -25 and -20; replay AP 85, 80 vs 65, 65
    assert "| A | joint | 2 | 87.5 87.5 | 87.5 | - | 85.0 |" in text  # every seed's AP listed
    bad = calibration_runs(
        tmp_path / "bad",
        seq=[(90, 40, 90), (91, 0, 80)],
        rep=[(90, 80, 90), (90, 45, 85)],
        joint=[[90, 85], [72, 74]],
        order="B",
    )
    cells = [c.strip() for c in study.calibration(bad).splitlines()[-1].split("|")[1:-1]]
    assert cells[0] == "B" and cells[1].startswith("yes")  # one seqlora seed forgets everything (BWT -45.5),
    assert cells[2].startswith("**NO**") and cells[3].startswith("**NO**") and cells[4].startswith("**NO**")
    assert cells[5] == "**NO**"  # one replay seed overlaps seqlora's, one joint seed is low


def test_lambda_frontier_puts_pas_rw_at_factor_zero(tmp_path):
    # planted bug: factors read from the wrong field, or the unregularized end of the curve missing
    runs = [
        write_run(tmp_path / "a", "pasmoe", 0, [[80.0, None], [70.0, 60.0]], lambda_a=10 * DEFAULT_LA),
        write_run(tmp_path / "b", "l2", 0, [[80.0, None], [40.0, 90.0]]),
        write_run(tmp_path / "c", "pas-rw", 0, [[90.0, None], [10.0, 90.0]]),
    ]
    table, curves = study.lambda_frontier(runs)
    assert curves["pasmoe"] == [(0, -40.0, 50.0, 90.0), (10, -5.0, 65.0, 70.0)]
    assert curves["l2"] == [(0, -40.0, 50.0, 90.0), (1, -20.0, 65.0, 85.0)]
    assert "| pasmoe | 10 | 1 | -5.0 | -5.0 | 65.0 | 70.0 |" in table


def test_paper_comparison_puts_ours_and_the_papers_side_by_side(tmp_path):
    # planted bugs: the paper's numbers printed as ours, a BWT invented for joint, rows unsorted
    runs = [
        write_run(tmp_path / "s0", "seqlora", 0, [[80.0, None], [20.0, 90.0]]),  # AP 55, BWT -30
        write_run(tmp_path / "s1", "seqlora", 1, [[80.0, None], [40.0, 90.0]]),  # AP 65, BWT -20
        write_run(tmp_path / "j", "joint", 0, [[None, None], [90.0, 90.0]]),
    ]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in study.paper_comparison(runs).splitlines()[2:]]
    mean, low, high = paired_difference([55.0, 65.0], [0.0, 0.0])
    assert rows[0] == ["seqlora", "2", f"{mean:.1f} [{low:.1f}, {high:.1f}]", rows[0][3], "SeqLoRA", "28.24", "-22.09"]
    assert rows[1] == ["joint", "1", "90.0", "-", "not in the paper", "-", "-"]


def test_a_lock_left_by_a_killed_study_is_taken_over(tmp_path):
    # planted bugs: a lock held forever after a kill (the study then skips that run until someone
    # deletes the file), or a live process's lock taken (two processes train one run)
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = tmp_path / ".run.lock"
    lock.write_text(f"{socket.gethostname()} {gone.pid}")
    assert study.take_lock(lock) and lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not study.take_lock(lock)  # now held by this live process
    lock.write_text(f"another-host {gone.pid}")
    assert not study.take_lock(lock)  # another host's process cannot be asked


def test_docs_tables_are_replaced_and_the_prose_around_them_kept(tmp_path):
    # planted bugs: a greedy match that swallows the prose between two tables, a second fill that
    # nests or duplicates a table, a misspelt table name that silently leaves a stale table
    doc = tmp_path / "README.md"
    doc.write_text(
        "intro\n<!-- study table: claims -->\nold claims\n<!-- end of study table -->\nprose between\n"
        "<!-- study table: lesson -->\nold\n<!-- end of study table -->\nend\n"
    )
    found = {"claims": ("t", "| new claims |\n"), "lesson": ("t", "| new lesson |\n")}
    study.fill_docs([doc], found)
    study.fill_docs([doc], found)
    assert doc.read_text() == (
        "intro\n<!-- study table: claims -->\n| new claims |\n<!-- end of study table -->\nprose between\n"
        "<!-- study table: lesson -->\n| new lesson |\n<!-- end of study table -->\nend\n"
    )
    doc.write_text("<!-- study table: claim -->\nold\n<!-- end of study table -->\n")
    with pytest.raises(ValueError, match="README.md: no study table named claim"):
        study.fill_docs([doc], found)


def test_lesson_quotes_every_seed_of_order_a_and_what_holds_in_each(tmp_path):
    # planted bugs: forgetting read with its sign flipped or from the wrong column, another order mixed into
    # the quoted range, a statement counted as holding over the seeds' means instead of seed by seed
    runs = [
        write_run(tmp_path / f"{method}{seed}{order}", method, seed, R, order=order, tasks=("numglue", "art"))
        for method, seed, R, order in [
            ("seqlora", 0, [[80.0, None], [50.0, 90.0]], "A"),
            ("seqlora", 1, [[70.0, None], [60.0, 90.0]], "A"),
            ("seqlora", 3, [[99.0, None], [0.0, 99.0]], "A"),
            ("seqlora", 0, [[99.0, None], [0.0, 99.0]], "B"),
            ("joint", 0, [[None, None], [90.0, 95.0]], "A"),
            ("joint", 1, [[None, None], [40.0, 45.0]], "A"),  # below seqlora's AP in seed 1 only
        ]
    ]
    rows = study.lesson(runs).splitlines()
    assert any(row.startswith("| 1 | seqlora: points of numglue forgotten | 3 | 10.0 to 99.0 |") for row in rows)
    assert any(
        row.startswith("| 1 | seqlora: lowest score right after a task's training | 3 | 70.0 to 99.0 |") for row in rows
    )
    assert not any("points of OCR" in row for row in rows)  # a task the stream lacks: no row
    assert "| 1 | seqlora forgets numglue | 3 of 3 seeds |" in rows
    assert "| 2 | joint training beats sequential fine-tuning | 1 of 2 seeds |" in rows  # the means would say yes


# ---- before and across the runs ----


def test_a_setting_a_planned_run_refuses_stops_the_study_before_its_first_run(tmp_path, capsys, monkeypatch):
    # planted bug: the study starts its 397 runs and dies hours in, at the first olora run, which
    # refuses weight decay (or a shared --dry-run that makes every run an instant plan)
    started = []
    monkeypatch.setattr(study, "run_study", lambda *args: started.append(args))
    for flags in (["--weight-decay", "0.01"], ["--dry-run"]):
        with pytest.raises(SystemExit):
            study.main([str(tmp_path / "s"), *flags])
    assert not started
    assert "olora needs --weight-decay 0" in capsys.readouterr().err


def test_runs_saved_before_the_scale_setting_count_as_paper_scale(tmp_path):
    # planted bug: an old run directory without mixture_scale taken as a scale-matched run
    old = write_run(tmp_path / "old", "pasmoe", 0, [[80.0]], tasks=("x",))
    old["config"].pop("mixture_scale")
    new = write_run(tmp_path / "new", "pasmoe", 0, [[70.0]], tasks=("x",))
    assert study.select([old, new], "pasmoe") == [new]
    assert study.select([old, new], "pasmoe", mixture_scale="paper") == [old]
