"""What a run's mechanisms did, from its saved gates and checkpoints (the paper's Fig. 3, 6 and 8).

    router_drift(run_dir, tasks)     per old task: JS divergence of the gates right after it vs at the end
    importance_stats(run_dir, T)     how concentrated I_agg is (share of the top 10% of (expert, rank))
    update_vs_importance(...)        how far each A row (B column) moved, by decile of old-task importance
    analyses(run), figures(...)      all of them for one run, and their figures

    python -m lab.analyses RUN_DIR [RUN_DIR ...]    writes analyses.json and figures/ in each run

The study (lab/study.py) judges the paper's mechanism claims on these numbers.
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache
from pathlib import Path

import torch

from evaluate import load_run


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits, row by row: (n, E), (n, E) -> (n,), in [0, 1]."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp_min(1e-12).log2() - b.clamp_min(1e-12).log2()), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def router_drift(run_dir: Path, tasks: list[str]) -> dict | None:
    """Per old task: mean over layers and tokens of JS(gates right after its task, gates at the end)."""
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
    return {
        "top10_share": sum(shares.values()) / len(shares),
        "per_layer_top10_share": shares,
        "maps": {k: v.tolist() for k, v in agg.items()},
    }


def update_vs_importance(run_dir: Path, T: int, factor: str = "lora_A") -> dict | None:
    """||a_ek(t) - a_ek(t-1)|| (factor "lora_A": rows of A) or ||b_ek(t) - b_ek(t-1)||
    ("lora_B": columns of B) against I_agg(t-1) (normalized per layer), pooled over layers and
    tasks 2..T, in importance deciles: does the method protect what old tasks used?"""
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
    return {
        "update_by_importance_decile": deciles,
        "top_over_bottom": deciles[-1] / deciles[0] if deciles[0] else None,
    }  # None: the least important never moved


def analyses(run: dict) -> dict:
    """Whatever the run directory allows: router drift, importance, update magnitudes."""
    run_dir, tasks = run["dir"], run["tasks"]
    out = {}
    drift = router_drift(run_dir, tasks)
    if drift:  # None, or empty for a one-task stream: no old task to drift
        out["router_drift"] = {
            "mean": sum(d["mean"] for d in drift.values()) / len(drift),
            "per_task": {k: d["mean"] for k, d in drift.items()},
            "per_layer": {k: d["per_layer"] for k, d in drift.items()},
        }
    if (Path(run_dir) / "ckpt" / f"task{len(tasks)}.safetensors").exists() and _adapter_tensors(
        run_dir, len(tasks), "importance_agg"
    ):
        out["importance"] = importance_stats(run_dir, len(tasks))
        updates = update_vs_importance(run_dir, len(tasks)) if len(tasks) > 1 else None
        if updates is not None:
            out["updates"] = updates
            out["updates_B"] = update_vs_importance(run_dir, len(tasks), "lora_B")
    return out


def analyses_text(found: dict) -> str:
    ratio = lambda r: "-" if r is None else f"{r:.2f}"  # noqa: E731 (None: the least important decile never moved)
    lines = []
    if "router_drift" in found:
        lines.append(
            f"router drift (JS, bits, mean over old tasks, layers, tokens): {found['router_drift']['mean']:.4f}"
        )
    if "importance" in found:
        lines.append(
            f"importance concentration: top 10% of (expert, rank) directions hold "
            f"{100 * found['importance']['top10_share']:.1f}% of I_agg (mean over layers)"
        )
    if "updates" in found:
        d = found["updates"]["update_by_importance_decile"]
        lines.append(
            f"A-row update size, least vs most important decile: {d[0]:.4f} vs {d[-1]:.4f} "
            f"(ratio {ratio(found['updates']['top_over_bottom'])})"
        )
    if "updates_B" in found:
        d = found["updates_B"]["update_by_importance_decile"]
        lines.append(
            f"B-column update size, least vs most important decile: {d[0]:.4f} vs {d[-1]:.4f} "
            f"(ratio {ratio(found['updates_B']['top_over_bottom'])})"
        )
    return "".join(line + "\n" for line in lines)


def figures(run: dict, found: dict) -> list[Path]:
    """router_drift.png, importance_map.png and update_vs_importance.png in RUN_DIR/figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir, made = Path(run["dir"]) / "figures", []
    fig_dir.mkdir(exist_ok=True)

    def save(fig, name):
        if name != "importance_map.png":  # laid out by hand (its colorbar has an axes of its own)
            fig.tight_layout()
        fig.savefig(fig_dir / name, dpi=90)
        plt.close(fig)
        made.append(fig_dir / name)

    if "router_drift" in found:
        per_task = found["router_drift"]["per_task"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(per_task), list(per_task.values()))
        ax.set(ylabel="JS divergence (bits)", title="router drift: an old task's gates after it vs at the end")
        ax.tick_params(axis="x", rotation=45)
        save(fig, "router_drift.png")
    if "importance" in found:
        save(importance_map(found["importance"]["maps"], plt), "importance_map.png")
    if "updates" in found:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(range(1, 11), found["updates"]["update_by_importance_decile"])
        ax.set(
            xlabel="old-task importance decile (1: least important)",
            ylabel="mean ||Δa_ek||",
            title="how far A rows moved in later tasks",
        )
        save(fig, "update_vs_importance.png")
    return made


def importance_map(maps: dict, plt):
    """I_agg per layer: a grid of decoder layers (rows, at most 4: the first ones and the last) by projection
    (columns), each an expert x rank heatmap of I_agg / its layer's mean (the weights of Eq. 11 before the
    clip), on one colour scale with one colorbar."""
    by_layer: dict[str, dict[str, list]] = {}
    for name, values in maps.items():
        layer, _, projection = name.rpartition(".")
        by_layer.setdefault(layer.rsplit(".", 1)[0].rsplit("layers.", 1)[-1], {})[projection] = values
    rows = list(by_layer)[:3] + list(by_layer)[3:][-1:]
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a Llama layer's, in turn
    columns = sorted(next(iter(by_layer.values())), key=lambda c: order.index(c) if c in order else len(order))
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(1.9 * len(columns) + 1, 1.6 * len(rows) + 0.8), squeeze=False
    )
    normalized = {
        (r, c): torch.tensor(by_layer[r][c]) / torch.tensor(by_layer[r][c]).mean() for r in rows for c in columns
    }
    top = max(v.max().item() for v in normalized.values())
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            image = axes[i, j].imshow(normalized[r, c].tolist(), aspect="auto", cmap="magma", vmin=0, vmax=top)
            axes[i, j].set(title=f"layer {r} {c.removesuffix('_proj')}", xticks=[], yticks=[])
            axes[i, j].title.set_fontsize(7)
        axes[i, 0].set_ylabel("expert e", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("rank k", fontsize=7)
    fig.subplots_adjust(left=0.04, right=0.9, top=0.86, bottom=0.08, wspace=0.08, hspace=0.35)
    fig.colorbar(image, cax=fig.add_axes([0.92, 0.12, 0.012, 0.7]), label="I_agg / layer mean")
    fig.suptitle("aggregated importance I_agg per layer and projection (expert x rank)", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by train_stream.py")
    for run_dir in parser.parse_args(argv).runs:
        run = load_run(run_dir)
        found = analyses(run)
        (run_dir / "analyses.json").write_text(json.dumps(found, indent=1))
        try:
            made = figures(run, found)
        except ImportError:
            made = []
        print(
            f"{run_dir}:\n"
            + (analyses_text(found) or "(no PASs layers: nothing to analyse)\n")
            + ("figures: " + ", ".join(str(p) for p in made) if made else "")
        )


if __name__ == "__main__":
    main()
