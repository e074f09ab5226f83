"""Does training make the policy better? The learning experiment, with its controls and statistics.

    .venv/bin/python bench/learning.py --recipe recipes/learn.yaml --seeds 0 1 2 --out runs/learning
    .venv/bin/python bench/learning.py ... --render-only          # redraw the section from runs/learning/learning.json

Per seed, three arms, each the whole recipe (warm start included; the warm start is deterministic, so all arms
start from the same weights, and the script checks that their round-0 accuracies agree):

* ``method``        — the recipe as written (e.g. MCTS → verified paths → expert iteration);
* ``random_reward`` — the same, with every leaf reward replaced by a coin flip at the round's positive rate
  (``train.control=random_reward``): a gain must beat this (random rewards gave +21 points on Qwen-Math,
  arXiv 2506.10947);
* ``zero_update``   — the same search and signals, no optimiser step (``train.control=zero_update``): it measures the
  evaluation itself (greedy decoding is deterministic, so it must equal the start exactly).

Held-out prompts come from the task's test split (disjoint from train by construction: ``synth_rows`` assigns each
problem to one split by a hash of its text). After the arms, every final policy and the start policy are evaluated
per prompt on ``--eval-size`` held-out prompts: greedy pass@1 for all, and the start policy's MCTS at the training
search budget (AlphaZero's test: the trained policy's *greedy* accuracy against the start's *search* accuracy).

Statistics: per arm, the gain (final − start greedy accuracy, points) per seed; mean and a 95 % confidence interval
over seeds (Student t, n − 1 degrees of freedom); per seed an exact McNemar test on the shared prompts (method vs
random-reward final policy, method vs start, method's greedy vs the start's MCTS). The section's sentences are
computed from these numbers. Everything else (per-round curves, timing) comes from the runs' ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_common import PY, ROOT, THINKTREE, run_logged  # noqa: E402

ARMS = {
    "method": [],
    "random_reward": ["train.control=random_reward"],
    "zero_update": ["train.control=zero_update"],
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95 % Student t quantiles by degrees of freedom."""


# ------------------------------------------------------------------------------------------------ statistics


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; 0 half-width for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, float]:
    """Exact two-sided McNemar test of paired outcomes: prompts only ``a`` got right vs only ``b`` got right."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": p}


# ------------------------------------------------------------------------------------------------ running


def per_prompt(
    checkpoint: str, recipe: str, seed: int, n: int, methods: list[str], log: Path
) -> dict[str, Any]:
    """Per-prompt correctness of ``checkpoint`` on ``n`` held-out prompts (a child process; see ``_eval_main``)."""
    out = log.with_suffix(".json")
    if not out.exists():
        cmd = [PY, __file__, "--eval-checkpoint", checkpoint, "--recipe", recipe, "--seeds", str(seed),
               "--eval-size", str(n), "--methods", ",".join(methods), "--eval-out", str(out)]  # fmt: skip
        run_logged(cmd, log)
    return json.loads(out.read_text())


def _eval_main(args: argparse.Namespace) -> None:
    """Child: evaluate one checkpoint per prompt and write ``{method: {correct: [...], tokens: n}}``."""
    import numpy as np

    from thinktree.rewards import get_task
    from thinktree.trainer.config import load_config
    from thinktree.trainer.models import load_policy
    from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method

    seed = args.seeds[0]
    cfg = load_config(args.recipe, [f"seed={seed}"])
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    model, tok = load_policy(args.eval_checkpoint)
    model.eval()
    prompts = make_prompts(
        task, task.load("test", n=args.eval_size, seed=seed), tok, cfg.model.use_chat_template
    )
    result = {}
    for method in args.methods.split(","):
        proposer = make_proposer(model, tok, cfg.search, 0.0 if method == "greedy" else None)
        found = run_method(method, prompts, proposer, make_outcome_fn(task), cfg.search,
                           np.random.default_rng(seed), answer_fn=task.extract_answer)  # fmt: skip
        steps_ok = [
            bool(task.check_steps([st.text for st in r.tree.trajectory(r.node).steps], r.tree.meta.get("numbers") or []))
            if hasattr(task, "check_steps") else None
            for r in found
        ]  # fmt: skip
        result[method] = {
            "correct": [bool((r.reward or 0.0) >= 0.5) for r in found],
            "steps_ok": steps_ok,
            "tokens_per_prompt": sum(r.budget.generated_tokens for r in found) / max(1, len(found)),
        }
    Path(args.eval_out).write_text(json.dumps(result))


def train(recipe: str, out: Path, overrides: list[str], log: Path) -> dict[str, Any]:
    """``thinktree train`` (resumable by ``out``) → its summary and the wall seconds of this call."""
    wall = run_logged(
        [*THINKTREE, "train", "--config", recipe, f"output.dir={out}", *overrides], log, timeout=6 * 3600
    )
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = wall
    return summary


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The three arms (each the full recipe, warm start included) and the per-prompt evaluations of one seed.

    Every arm runs ``thinktree train --config RECIPE seed=S [train.control=...]`` as a user would. The warm start is
    deterministic, so the arms start from identical weights (checked: their round-0 accuracies must agree).
    """
    base = args.out / f"seed{seed}"
    common = [f"seed={seed}", "output.report_to=[]", f"task.eval_size={args.curve_size}", "eval.methods=[greedy]",
              "eval.health=false", *args.set]  # fmt: skip
    arms: dict[str, Any] = {}
    for arm, extra in ARMS.items():
        if arm == "zero_update" and args.zero_rounds is not None:
            extra = [*extra, f"rounds.num_rounds={args.zero_rounds}"]
        summary = train(args.recipe, base / arm, [*common, *extra], base / f"{arm}.log")
        last = summary["rounds"][-1]
        final = str(base / arm / f"round-{last['round']:02d}" / "checkpoint")
        evals = per_prompt(final, args.recipe, seed, args.eval_size, ["greedy"], base / f"eval_{arm}.log")
        arms[arm] = {
            "curve": [{"round": r["round"], "accuracy": r["eval"]["greedy"]["accuracy"],
                       "generated_tokens": r.get("generated_tokens", 0)} for r in summary["rounds"] if "eval" in r],
            "greedy": evals["greedy"]["correct"],
            "eval": evals["greedy"],
            "wall_s": summary["wall_s"],
            "warm_start_s": (summary.get("warm_start") or {}).get("time_s"),
            "search_accuracy": [r.get("search_accuracy") for r in summary["rounds"][1:]],
        }  # fmt: skip
    starts = {arm: a["curve"][0]["accuracy"] for arm, a in arms.items()}
    if len(set(starts.values())) != 1:
        raise RuntimeError(f"seed {seed}: the arms' warm starts differ (round-0 accuracy {starts})")
    ckpt = str(base / "method" / "warm_start" / "checkpoint")
    start = per_prompt(ckpt, args.recipe, seed, args.eval_size, ["greedy", "mcts"], base / "eval_start.log")
    return {"seed": seed, "start": start, "arms": arms}


# ------------------------------------------------------------------------------------------------ analysis


def analyse(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Gains with CIs per arm, McNemar tests per seed, and the goals' verdicts (see module doc)."""
    acc = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    out: dict[str, Any] = {"n_seeds": len(seeds), "n_eval": len(seeds[0]["start"]["greedy"]["correct"])}
    out["start_greedy"] = mean_ci([acc(s["start"]["greedy"]["correct"]) for s in seeds])
    out["start_mcts"] = mean_ci([acc(s["start"]["mcts"]["correct"]) for s in seeds])

    def sound(ev: dict) -> list[bool]:  # correct answer reached through valid steps only
        return [
            c and bool(ok) for c, ok in zip(ev["correct"], ev.get("steps_ok") or [False] * len(ev["correct"]))
        ]

    out["start_sound"] = mean_ci([acc(sound(s["start"]["greedy"])) for s in seeds])
    for arm in ARMS:
        out[arm] = {"sound": mean_ci([acc(sound(s["arms"][arm]["eval"])) for s in seeds])}
        finals = [acc(s["arms"][arm]["greedy"]) for s in seeds]
        gains = [acc(s["arms"][arm]["greedy"]) - acc(s["start"]["greedy"]["correct"]) for s in seeds]
        out[arm].update({"final": mean_ci(finals), "gain": mean_ci(gains), "gains": gains})
    vs_start = [mcnemar(s["arms"]["method"]["greedy"], s["start"]["greedy"]["correct"]) for s in seeds]
    out["mcnemar_vs_start"] = vs_start
    vs_random = [mcnemar(s["arms"]["method"]["greedy"], s["arms"]["random_reward"]["greedy"]) for s in seeds]
    vs_mcts = [mcnemar(s["arms"]["method"]["greedy"], s["start"]["mcts"]["correct"]) for s in seeds]
    out["mcnemar_vs_random"], out["mcnemar_vs_start_mcts"] = vs_random, vs_mcts
    gap = [acc(s["arms"]["method"]["greedy"]) - acc(s["start"]["mcts"]["correct"]) for s in seeds]
    out["greedy_minus_start_mcts"] = mean_ci(gap)
    return out


def _fmt(mc: tuple[float, float]) -> str:
    m, h = mc
    return f"{m:+.1f} ± {h:.1f}" if math.isfinite(h) else f"{m:+.1f}"


def plot(result: dict[str, Any], path: Path) -> None:
    """Held-out greedy accuracy per round, one line per arm and seed (the curves' prompts), start MCTS dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colors = {"method": "tab:green", "random_reward": "tab:red", "zero_update": "tab:grey"}
    for s in result["seeds"]:
        for arm, a in s["arms"].items():
            pts = [(c["round"], 100 * c["accuracy"]) for c in a["curve"]]
            ax.plot(*zip(*pts), marker="o", color=colors[arm], alpha=0.7,
                    label=arm if s is result["seeds"][0] else None)  # fmt: skip
    mcts = result["analysis"]["start_mcts"][0]
    ax.axhline(
        mcts, linestyle="--", color="tab:blue", label=f"start policy's MCTS ({mcts:.1f} %, final eval set)"
    )
    n = max(len(a["curve"]) for s in result["seeds"] for a in s["arms"].values())
    ax.set_xticks(range(n))
    ax.set(xlabel="round (0 = after the warm start)", ylabel="held-out greedy pass@1 (%), curve prompts",
           title="Expert iteration vs controls, one line per seed")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def section(result: dict[str, Any], img: str | None = None) -> str:
    """The markdown section: table, per-seed tests, and conclusions computed from the numbers."""
    a = result["analysis"]
    n, k = a["n_eval"], a["n_seeds"]
    lines = [
        "## Learning where search pays: expert iteration on countdown, with controls",
        "",
        *([f"![learning curves]({img})", ""] if img else []),
        f"`{result['command']}` — recipe `{result['recipe']}`, {k} seed(s), {n} held-out prompts (test split, disjoint "
        f"from train), greedy pass@1. Gains are final − start in points, mean ± 95 % CI over seeds (Student t).",
        "",
        "| arm | final greedy (%) | gain (points) | gains per seed | answer right and every step valid (%) |",
        "|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = a[arm]
        lines.append(f"| {arm} | {r['final'][0]:.1f} | {_fmt(r['gain'])} | "
                     f"{', '.join(f'{g:+.1f}' for g in r['gains'])} | {r['sound'][0]:.1f} |")  # fmt: skip
    lines += [
        f"| start (warm start), greedy | {a['start_greedy'][0]:.1f} | | | {a['start_sound'][0]:.1f} |",
        f"| start (warm start), MCTS at the training budget | {a['start_mcts'][0]:.1f} | | | |",
        "",
        "McNemar (exact, per seed; only-method / only-other, p): vs the start "
        + "; ".join(f"{t['only_a']}/{t['only_b']}, p={t['p']:.2g}" for t in a.get("mcnemar_vs_start", []))
        + " — vs random-reward "
        + "; ".join(f"{t['only_a']}/{t['only_b']}, p={t['p']:.2g}" for t in a["mcnemar_vs_random"])
        + " — vs the start's MCTS "
        + "; ".join(f"{t['only_a']}/{t['only_b']}, p={t['p']:.2g}" for t in a["mcnemar_vs_start_mcts"]),
        "",
    ]
    lines += [f"- {s}" for s in conclusions(a)]
    return "\n".join(lines) + "\n"


def conclusions(a: dict[str, Any]) -> list[str]:
    """Sentences whose verdicts are computed from the analysis (nothing here is fixed text about the outcome)."""
    m, mh = a["method"]["gain"]
    r, rh = a["random_reward"]["gain"]
    z = a["zero_update"]["gain"][0]
    out = []
    ci_low = m - mh if math.isfinite(mh) else float("nan")
    beats_random = all(t["p"] < 0.05 and t["only_a"] > t["only_b"] for t in a["mcnemar_vs_random"])
    sig = sum(t["p"] < 0.05 and t["only_a"] > t["only_b"] for t in a.get("mcnemar_vs_start", []))
    out.append(f"Method gain {m:+.1f} points (95 % CI {_fmt((m, mh))}): "
               + ("the interval excludes 0" if ci_low > 0 else "the interval does not exclude 0")
               + f"; the final policy beats its own start significantly (McNemar p < 0.05) on {sig} of "
               + f"{len(a.get('mcnemar_vs_start', []))} seeds.")  # fmt: skip
    out.append(f"Random-reward control {r:+.1f} points: " + ("within" if abs(r) <= 2 else "outside")
               + " the ±2-point band around the start; the method "
               + ("beats it on every seed (McNemar p < 0.05)." if beats_random else "does not beat it on every seed."))  # fmt: skip
    out.append(f"Zero-update control {z:+.1f} points: "
               + ("the evaluation is deterministic, as it must be." if abs(z) < 1e-9 else "NOT equal to the start: the evaluation is not deterministic."))  # fmt: skip
    g, gh = a["greedy_minus_start_mcts"]
    out.append(f"AlphaZero's test (trained greedy − start MCTS): {_fmt((g, gh))} points: "
               + ("met." if g >= 0 else "not met."))  # fmt: skip
    out.append(
        "Goal +15 points greedy on the search-pays task: " + ("met." if m >= 15 else f"not met ({m:+.1f}).")
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "learn.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "learning")
    p.add_argument(
        "--eval-size", type=int, default=512, help="held-out prompts of the final per-prompt evaluation"
    )
    p.add_argument("--curve-size", type=int, default=256, help="held-out prompts of each round's curve point")
    p.add_argument(
        "--zero-rounds", type=int, default=None, help="rounds of the zero-update arm (default: recipe's)"
    )
    p.add_argument(
        "--lanes", type=int, default=2, help="seeds run at once (child processes, one thread each)"
    )
    p.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every run (key=value)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--page", type=Path, default=None, help="also write the section to this markdown file")
    p.add_argument("--img", type=Path, default=None, help="write the learning-curve plot here (PNG)")
    p.add_argument("--eval-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--methods", default="greedy", help=argparse.SUPPRESS)
    p.add_argument("--eval-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.eval_checkpoint:
        return _eval_main(args)
    path = args.out / "learning.json"
    if not args.render_only:
        start = time.perf_counter()
        with ThreadPoolExecutor(args.lanes) as pool:
            seeds = list(pool.map(lambda s: run_seed(args, s), args.seeds))
        result = {"recipe": str(Path(args.recipe).relative_to(ROOT)) if Path(args.recipe).is_absolute() else args.recipe,
                  "command": "python bench/learning.py " + " ".join(sys.argv[1:]), "seeds": seeds,
                  "wall_s": time.perf_counter() - start,
                  "finished_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        result["analysis"] = analyse(seeds)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    result = json.loads(path.read_text())
    result["analysis"] = analyse(result["seeds"])  # recomputed from the per-prompt results on every render
    if args.img:
        plot(result, args.img)
    rel = None
    if args.img and args.page:
        rel = os.path.relpath(args.img, args.page.parent)
    text = section(result, rel)
    print(text)
    if args.page:
        args.page.write_text(text)
    a = result["analysis"]
    print(json.dumps({"method_gain": a["method"]["gain"], "random_gain": a["random_reward"]["gain"],
                      "zero_gain": a["zero_update"]["gain"], "greedy_minus_start_mcts": a["greedy_minus_start_mcts"],
                      "wall_s": result.get("wall_s")}, default=None).replace("NaN", "null"))  # fmt: skip


if __name__ == "__main__":
    main()
