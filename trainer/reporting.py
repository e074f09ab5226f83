"""Per-round reporting: a table in the log, ``summary.json``, TensorBoard events (accelerate's tracker) and a PNG.

Metrics are namespaced as ``eval/<method>/accuracy``, ``search/…``, ``train/…``. The PNG plots held-out accuracy per
round, one line per evaluation method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from thinktree.trainer.config import RecipeConfig, config_to_dict
from thinktree.trainer.outputs import write_json_atomic

log = logging.getLogger("thinktree")

__all__ = ["Reporter", "flat_metrics", "format_table"]

_SEARCH_KEYS = ("generated_tokens", "search_time_s", "leaf_reward_mean", "search_accuracy", "reused_trees")
_SIGNAL_KEYS = ("traces", "pairs", "advantage_records", "advantage_tokens", "nonzero_advantage_tokens")
_NOT_TRAIN = (
    *_SEARCH_KEYS,
    *_SIGNAL_KEYS,
    "round",
    "eval",
    "eval_time_s",
    "checkpoint",
    "trees",
    "stepwise",
    "collapse",
    "control",
)


def flat_metrics(row: dict) -> dict[str, float]:
    """The numeric metrics of one round row, with namespaced names."""
    out: dict[str, float] = {}
    for method, m in row.get("eval", {}).items():
        for k in ("accuracy", "tokens_per_prompt", "wall_time_s"):
            out[f"eval/{method}/{k}"] = float(m[k])
    for k in _SEARCH_KEYS:
        if row.get(k) is not None:
            out[f"search/{k}"] = float(row[k])
    for k, v in row.items():
        if k.startswith("health/") and isinstance(v, (int, float)):
            out[k] = float(v)
    for k in _SIGNAL_KEYS:
        if row.get(k):
            out[f"signals/{k}"] = float(row[k])
    for k, v in row.items():
        if k not in _NOT_TRAIN and "/" not in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"round/{k}"] = float(v)
    return out


def _num(row: dict, key: str) -> str:
    return f"{row[key]:.4g}" if isinstance(row.get(key), (int, float)) else "-"


def _signals(row: dict) -> str:
    for k, label in (("traces", "traces"), ("pairs", "pairs"), ("advantage_tokens", "adv tok")):
        if row.get(k):
            return f"{row[k]} {label}"
    return "-" if "trees" not in row else "0"


def format_table(rows: list[dict]) -> str:
    """A plain-text table: one line per round: accuracy per method, search tokens, signals, bits/char, KL, time."""
    methods = sorted({m for r in rows for m in r.get("eval", {})})
    head = ["round"] + [f"acc[{m}]" for m in methods] + ["search tok", "signals", "bits/char", "KL", "eval s"]
    lines = [" | ".join(f"{h:>12}" for h in head)]
    for r in rows:
        cells = [str(r["round"])]
        cells += [f"{r['eval'][m]['accuracy']:.3f}" if m in r.get("eval", {}) else "-" for m in methods]
        cells += [str(r.get("generated_tokens", "-")), _signals(r), _num(r, "health/bits_per_char_ref")]
        cells += [_num(r, "health/kl_from_round0"), _num(r, "eval_time_s")]
        lines.append(" | ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


class Reporter:
    """Collects round rows; logs each to TensorBoard (if configured) and writes the final summary and plot."""

    def __init__(self, out: Path, cfg: RecipeConfig, enabled: bool = True) -> None:
        self.out, self.cfg, self.rows, self.enabled = out, cfg, [], enabled
        self.global_step = 0
        self.tracker = None
        if enabled and "tensorboard" in cfg.output.report_to:
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker("tensorboard", str(out))
            self.tracker.start()
            self.tracker.store_init_configuration(_flat_config(cfg))

    def round(self, row: dict, rdir: Path | None = None) -> None:
        """Log one round: its row at step = round (``eval/…``, ``search/…``, ``signals/…``, ``health/…``,
        ``round/…`` for the round's last training metrics), and each optimiser step's ``train/…`` metrics
        (``train_metrics.jsonl``) on a global step axis."""
        self.rows.append(row)
        if self.tracker is not None:
            self.tracker.log(flat_metrics(row), step=row["round"])
            steps = rdir / "train_metrics.jsonl" if rdir is not None else None
            if steps is not None and steps.exists():
                for line in steps.read_text().splitlines():
                    self.global_step += 1
                    self.tracker.log(
                        {f"step/{k}": v for k, v in json.loads(line).items()}, step=self.global_step
                    )
        if self.enabled:
            log.info("round %d:\n%s", row["round"], format_table([row]))

    def finish(self, warm_start: dict | None) -> dict:
        summary = {
            "recipe": self.cfg.output.dir,
            "warm_start": warm_start,
            "rounds": self.rows,
            "accuracy_before": _acc(self.rows[0]) if self.rows else None,
            "accuracy_after": _acc(self.rows[-1]) if self.rows else None,
        }
        if not self.enabled:
            return summary
        write_json_atomic(self.out / "summary.json", summary)
        if self.rows:
            _plot(self.rows, self.out / "accuracy.png")
        if self.tracker is not None:
            self.tracker.finish()
        print("\n" + format_table(self.rows))
        print(f"held-out accuracy before rounds: {summary['accuracy_before']}")
        print(f"held-out accuracy after rounds:  {summary['accuracy_after']}")
        print(f"summary: {self.out / 'summary.json'}")
        return summary


def _acc(row: dict) -> dict[str, float]:
    return {m: v["accuracy"] for m, v in row.get("eval", {}).items()}


def _flat_config(cfg: RecipeConfig) -> dict[str, Any]:
    def walk(d: dict, prefix: str = "") -> dict:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(walk(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out

    return walk(config_to_dict(cfg))


def _plot(rows: list[dict], path: Path) -> None:
    """Accuracy per round (one line per method) beside the health metrics: bits/char and KL from round 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    health = any(k.startswith("health/") for r in rows for k in r)
    fig, axes = plt.subplots(1, 2 if health else 1, figsize=(11 if health else 6, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    rounds = [r["round"] for r in rows]
    for m in sorted({m for r in rows for m in r.get("eval", {})}):
        pts = [(r["round"], 100 * r["eval"][m]["accuracy"]) for r in rows if m in r.get("eval", {})]
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.set(
        xlabel="round (0 = after warm start)",
        ylabel="held-out accuracy (%)",
        title="Held-out accuracy per round",
    )
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(title="method")
    if health:
        ax = axes[0][1]
        for key, label in (("health/bits_per_char_ref", "bits/char, reference traces"),
                           ("health/bits_per_char_own", "bits/char, own greedy solutions"),
                           ("health/general_nll_bits_per_char", "bits/char, general text")):  # fmt: skip
            pts = [(r["round"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xlabel="round", ylabel="bits per character", title="Compression and drift per round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        kl = [(r["round"], r["health/kl_from_round0"]) for r in rows if "health/kl_from_round0" in r]
        if kl:
            ax2 = ax.twinx()
            ax2.plot(
                *zip(*kl), marker="s", linestyle="--", color="grey", label="KL from round 0 (nats/token)"
            )
            ax2.set_ylabel("KL from round 0 (nats/token)")
            ax2.legend(loc="upper right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
