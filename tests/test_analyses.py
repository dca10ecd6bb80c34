"""lab/analyses.py: what a run's mechanisms did, from checkpoints built in the test."""

import pytest
import torch
from safetensors.torch import save_file

from lab.analyses import update_vs_importance


def test_update_vs_importance_sorts_row_and_column_moves_by_importance(tmp_path):
    # planted bugs: the norm over the wrong axis (columns of A, rows of B), or deciles taken
    # in the order of the layer instead of the importance
    (tmp_path / "ckpt").mkdir()
    r, d, o = 10, 3, 4
    importance = torch.tensor([[5.0, 1, 9, 3, 7, 2, 10, 4, 8, 6]])  # (e=1, r)
    A1, B1 = torch.randn(1, r, d), torch.randn(1, o, r)
    A2, B2 = A1.clone(), B1.clone()
    for k in range(r):
        A2[0, k, 0] += 0.1 * importance[0, k]  # row k of A moves by 0.1 x its importance
        B2[0, 0, k] -= 1.0 / importance[0, k]  # column k of B moves by 1 / its importance
    for t, (A, B) in enumerate([(A1, B1), (A2, B2)], start=1):
        save_file(
            {"m.lora_A": A, "m.lora_B": B, "m.importance_agg": importance}, tmp_path / "ckpt" / f"task{t}.safetensors"
        )
    rows = update_vs_importance(tmp_path, 2, "lora_A")
    assert rows["update_by_importance_decile"] == pytest.approx([0.1 * i for i in range(1, 11)], rel=1e-5)
    cols = update_vs_importance(tmp_path, 2, "lora_B")
    assert cols["update_by_importance_decile"] == pytest.approx([1.0 / i for i in range(1, 11)], rel=1e-5)
    assert cols["top_over_bottom"] == pytest.approx(0.1, rel=1e-5)
