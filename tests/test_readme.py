"""The README's promises: its snippet runs, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_snippet_runs(capsys):
    section = README.split("## Use the layer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([6, 8])"


def test_ci_runs_the_readme_test_command():
    quick_start = README.split("## Quick start", 1)[1]
    command = re.search(r"&& (python -m pytest[^\n#]*?)\s*#", quick_start).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_no_placeholder_is_left():
    assert "PLACEHOLDER" not in README
