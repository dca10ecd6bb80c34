"""pasmoe.py copied alone into an empty directory, as a user copies it into a project."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pasmoe_alone_passes_its_checks(tmp_path):
    # planted bugs: pasmoe.py importing anything of the project, or any behaviour that
    # tests/layer_alone.py checks (freezing, dtypes, meta init, attributes, refusals, nesting)
    shutil.copy(ROOT / "pasmoe.py", tmp_path / "pasmoe.py")
    shutil.copy(ROOT / "tests" / "layer_alone.py", tmp_path / "test_layer_alone.py")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")  # for its snippet
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_layer_alone.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "12 passed" in done.stdout, done.stdout[-1000:]
