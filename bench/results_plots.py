"""Plots of ``bench/results.py`` (matplotlib, Agg): learning curves and test-time compute curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {
    "tree_grpo": "tree-GRPO (MCTS, TreeRL adv.)",
    "iid_grpo": "i.i.d. GRPO (self-consistency samples)",
    "mcts_dpo": "MCTS step-DPO",
    "mamba_tree_grpo": "tree-GRPO, tiny Mamba (seed 0 only)",
}


def mean_curve(curves: list[list[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean cumulative tokens, mean / min / max accuracy (%) per round over seeds."""
    n = min(len(c) for c in curves)
    tok = np.array([[c[i]["cum_tokens"] for i in range(n)] for c in curves], dtype=float)
    acc = 100 * np.array([[c[i]["accuracy"] for i in range(n)] for c in curves], dtype=float)
    return tok.mean(0), acc.mean(0), acc.min(0), acc.max(0)


def plot_learning(curves: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    """Left: accuracy vs cumulative search tokens; right: accuracy vs round. Error bars = min..max over seeds."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, runs in curves.items():
        if not runs:
            continue
        tok, acc, lo, hi = mean_curve(runs)
        err = np.vstack([acc - lo, hi - acc])
        style = "--" if name.startswith("mamba") else "-"
        ax1.errorbar(tok / 1000, acc, yerr=err, marker="o", ls=style, capsize=3, label=LABELS.get(name, name))
        ax2.errorbar(
            np.arange(len(acc)), acc, yerr=err, marker="o", ls=style, capsize=3, label=LABELS.get(name, name)
        )
    ax1.set_xlabel("cumulative generated tokens of the rounds' search (thousands)")
    ax2.set_xlabel("round (0 = SFT warm start)")
    for ax in (ax1, ax2):
        ax.set_ylabel("held-out pass@1, greedy (%)")
        ax.grid(alpha=0.3)
    ax2.set_xticks(range(max(len(r[0]) for r in curves.values() if r)))
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=9, loc="lower center", ncol=min(4, len(labels)), frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_test_time(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy vs generated tokens per prompt, one line per method (compute-optimal: one line per rule)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        key = r["method"] if r["method"] != "compute_optimal" else f"compute_optimal ({r.get('rule') or '?'})"
        groups.setdefault(key, []).append(
            (float(r["tokens_per_prompt"]), 100 * float(r["accuracy"]), r["budget"])
        )
    markers = iter("osD^v<>ph*")
    for key, pts in sorted(groups.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=next(markers, "o"), linestyle="--" if "PRM" in key else "-", label=key)
        for x, y, b in pts:
            if b not in (None, "", "None"):
                ax.annotate(str(b), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    xs_all = [p[0] for pts in groups.values() for p in pts]
    ax.set_xticks(
        [
            t
            for t in (10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000, 5000)
            if min(xs_all) * 0.8 <= t <= max(xs_all) * 1.25
        ]
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("generated tokens per prompt (log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(tp: dict[str, Any], path: Path) -> None:
    """Bar chart of tokens/s: search vs generate vs sequential; tree-GRPO step vs TRL GRPOTrainer step."""
    s, t = tp["search"], tp["train_step"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["batched MCTS\n(prefix cache)", "model.generate\n(same width)", "sequential MCTS\n(no cache)"]
    vals = [s.get("search_tok_s", 0), s.get("generate_tok_s", 0), s.get("sequential_tok_s", 0)]
    ax1.bar(names, vals, color=["C0", "C1", "C2"])
    ax1.set_ylabel("generated tokens per second")
    ax1.set_title("search throughput (tiny Llama, CPU)", fontsize=10)
    ax2.bar(["thinktree\ntree-GRPO step", "TRL\nGRPOTrainer step"], [t.get("thinktree_tok_s", 0), t.get("trl_tok_s", 0)],
            color=["C0", "C3"])  # fmt: skip
    ax2.set_ylabel("trained tokens per second")
    ax2.set_title("one optimiser step, same batch (CPU)", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
