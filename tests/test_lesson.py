"""LESSON.md must not rot: its commands are accepted by the command line, its Python
experiment runs and prints what the lesson says, and one exercise runs at a reduced size and
writes the files the lesson tells students to look at."""

import re
import shlex
from pathlib import Path

import pytest
from helpers import REDUCED, only_read

import train_stream as ts

ROOT = Path(__file__).resolve().parent.parent
LESSON = (ROOT / "LESSON.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", LESSON, re.DOTALL)
COMMANDS = [
    line.split("#")[0].strip()
    for lang, block in BLOCKS
    if lang == "bash"
    for line in block.splitlines()
    if line.startswith("python train_stream.py")
]


def test_the_lesson_has_its_exercises():
    assert 6 <= len(re.findall(r"^## Exercise \d", LESSON, re.MULTILINE)) <= 8
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_accepted(command):
    # planted bug: a flag or method renamed in train_stream.py but not in the lesson
    ts.parse_args(shlex.split(command)[2:])


def test_the_python_experiment_prints_what_the_lesson_says(capsys):
    # planted bug: the layer's gate or importance no longer matching Eq. 7 or Eq. 9 as written
    code = next(block for lang, block in BLOCKS if lang == "python")
    exec(compile(code, "LESSON.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.endswith("True") for line in lines), lines


def test_exercise_one_at_a_reduced_size_writes_what_students_look_at(tmp_path):
    # planted bug: the run directory's files renamed, so the lesson points at nothing
    argv = shlex.split(COMMANDS[0])[2:]
    argv = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    cfg, _ = ts.parse_args(
        only_read(argv + REDUCED + ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    )
    ts.run(cfg)
    looked_at = set(re.findall(r"`runs/[^/`]+/([^`]+)`", LESSON.split("## Exercise 2", 1)[0]))
    assert looked_at, "exercise 1 names no file to look at"
    for name in looked_at:
        if name.startswith("figures/"):
            pytest.importorskip("matplotlib")
        assert (tmp_path / "run" / name).exists(), name


def test_the_lesson_states_only_what_held_in_every_seed():
    # planted bugs: a statement the study's seeds contradict kept in the lesson ("holds in 2 of 3 seeds"),
    # a statement of lab/study.py's STATEMENTS, or an exercise's table, missing from the page, or a
    # placeholder left for numbers that were never filled in
    from lab import study

    rows = re.findall(r"^\| (\d) \| (.+?) \| (\d+) of (\d+) seeds \|$", LESSON, re.MULTILINE)
    assert {(e, s) for e, s, _, _ in rows} == {(e, s) for e, s, _, _ in study.STATEMENTS}
    for exercise, statement, held, seeds in rows:
        assert int(seeds) >= 3 and held == seeds, (exercise, statement, f"{held} of {seeds}")
    for exercise in {row[0] for row in study.LESSON}:
        assert f"<!-- study table: lesson-{exercise} -->\n| exercise |" in LESSON, exercise
    assert "(no runs yet)" not in LESSON and "<!-- answer" not in LESSON and "<!-- measured" not in LESSON
