"""Experiment 1 of ``bench/results.py``: learning curves of a tiny policy on ``arith`` (quickstart recipe).

One SFT warm start per seed (``thinktree train`` with ``rounds.num_rounds=0``); every method then starts from that
checkpoint (``model.policy=<dir>``, ``rounds.warm_start.algo=none``) and runs its rounds:

* ``tree_grpo`` — MCTS trees, TreeRL per-step advantages, token-level GRPO (the quickstart recipe);
* ``iid_grpo``  — i.i.d. samples (``search.method=self_consistency``) with GRPO's group baseline, ``num_samples``
  set from tree-GRPO's measured round-1 tokens per prompt ÷ the warm start's greedy tokens per prompt, so both
  spend about the same generated tokens per round;
* ``mcts_dpo``  — MCTS trees → sibling step pairs → DPO;
* ``mamba_tree_grpo`` — a tiny Mamba (parameter count matched to the Llama within a few %) with its own warm start
  and the same tree-GRPO loop, when its measured training step is fast enough on this machine (see ``run_mamba``).

Each run is resumable by its output dir (``runs/results/<mode>/learning/...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from results_common import PY, ROOT, THINKTREE, read_json, run_json, run_logged

RECIPE = str(ROOT / "recipes" / "quickstart.yaml")
LLAMA_SIZES = {"hidden_size": 128, "num_hidden_layers": 4}
MAMBA_SIZES = {"hidden_size": 128, "num_hidden_layers": 5}
METHODS: dict[str, list[str]] = {
    "tree_grpo": ["search.method=mcts", "train.algo=grpo", "train.advantage=treerl"],
    "iid_grpo": ["search.method=self_consistency", "train.algo=grpo", "train.advantage=grpo"],
    "mcts_dpo": ["search.method=mcts", "train.algo=dpo", "train.learning_rate=1.0e-5", "train.steps=40"],
}


def _flow(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


PREVIOUS_QUICKSTART = [
    "train.learning_rate=2.0e-5", "train.lr_scheduler_type=constant", "train.warmup_steps=0", "train.steps=0",
    "rounds.traces_per_tree=1", "rounds.warm_start.examples=null",
]  # fmt: skip
"""This experiment's settings as it was designed (the quickstart's before it became expert iteration on one optimiser);
the methods' own overrides (``METHODS``) come after these."""


def common(sizes: dict[str, Any], seed: int) -> list[str]:
    return [
        *PREVIOUS_QUICKSTART,
        f"task.eval_size={sizes['eval_size']}", f"rounds.prompts_per_round={sizes['prompts_per_round']}",
        f"seed={seed}", "eval.methods=[greedy]", "eval.health=false", "output.report_to=[]",
    ]  # fmt: skip


def train(out: Path, overrides: list[str], log: Path) -> dict[str, Any]:
    """``thinktree train`` (resumable by ``out``) → its summary plus the wall seconds of this call."""
    wall = run_logged([*THINKTREE, "train", "--config", RECIPE, f"output.dir={out}", *overrides], log)
    summary = read_json(out / "summary.json")
    summary["wall_s"] = wall
    return summary


def run_checkpoint(run: Path, checkpoint: str) -> str:
    """A summary's ``checkpoint`` entry as a path: relative to the run dir (absolute in runs written before)."""
    return checkpoint if Path(checkpoint).is_absolute() else str(run / checkpoint)


def curve(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per round: greedy held-out accuracy, the round's search tokens and the cumulative tokens."""
    rows, cum = [], 0
    for r in summary["rounds"]:
        cum += int(r.get("generated_tokens") or 0)
        sig = {k: r[k] for k in ("pairs", "records", "traces", "trained_tokens") if k in r}
        rows.append({
            "round": r["round"], "accuracy": r["eval"]["greedy"]["accuracy"],
            "greedy_tokens_per_prompt": r["eval"]["greedy"].get("tokens_per_prompt"),
            "generated_tokens": int(r.get("generated_tokens") or 0), "cum_tokens": cum,
            "search_accuracy": r.get("search_accuracy"), "search_time_s": r.get("search_time_s"),
            "train_time_s": r.get("train_time_s"), "signals": sig,
        })  # fmt: skip
    return rows


def iid_samples(tree: dict[str, Any], start_tokens_per_prompt: float, prompts: int) -> int:
    """Samples per prompt that make i.i.d. sampling spend tree-GRPO's round-1 tokens (clamped to 2..48)."""
    tree_tokens = tree["curve"][1]["generated_tokens"] / prompts
    return max(2, min(48, round(tree_tokens / max(1.0, start_tokens_per_prompt))))


def run_seed(root: Path, sizes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Warm start once, then tree-GRPO, i.i.d. GRPO (token-matched) and MCTS-DPO from it."""
    base, log = root / f"seed{seed}", root / f"seed{seed}" / "log.txt"
    ws = train(
        base / "warm_start", [*common(sizes, seed), "rounds.num_rounds=0", "rounds.warm_start.algo=sft",
                              f"rounds.warm_start.steps={sizes['ws_steps']}"], log,
    )  # fmt: skip
    ckpt = run_checkpoint(base / "warm_start", ws["warm_start"]["checkpoint"])
    start = ws["rounds"][0]["eval"]["greedy"]
    out: dict[str, Any] = {"warm_start": {"accuracy": start["accuracy"], "time_s": ws["warm_start"]["time_s"],
                                          "tokens_per_prompt": start["tokens_per_prompt"], "checkpoint": ckpt}}  # fmt: skip
    from_ckpt = [*common(sizes, seed), f"model.policy={ckpt}", "rounds.warm_start.algo=none",
                 f"rounds.num_rounds={sizes['rounds']}"]  # fmt: skip
    for name, extra in METHODS.items():
        if name == "iid_grpo":
            n = iid_samples(out["tree_grpo"], start["tokens_per_prompt"], sizes["prompts_per_round"])
            extra = [*extra, f"search.num_samples={n}"]
        s = train(base / name, [*from_ckpt, *extra], log)
        out[name] = {"curve": curve(s), "wall_s": s["wall_s"], "overrides": extra}
    out["tree_grpo"]["paths"] = path_audit(base / "tree_grpo")
    if seed == sizes["seeds"][0] and sizes["lr_sweep"]:
        out.update(lr_sensitivity(base, sizes, from_ckpt, ckpt, log))
    return out


def lr_sensitivity(base: Path, sizes: dict[str, Any], from_ckpt: list[str], ckpt: str, log: Path) -> dict:
    """Tree-GRPO with only the learning rate changed (the recipe's rate is the main row), then the first swept
    run's round 1 redone under controlled advantages (``bench/lucky_paths.py``)."""
    sweep = {}
    for lr in sizes["lr_sweep"]:
        run = base / f"tree_grpo_lr{lr}"
        s = train(run, [*from_ckpt, *METHODS["tree_grpo"], f"train.learning_rate={lr}"], log)
        sweep[str(lr)] = {"curve": curve(s), "wall_s": s["wall_s"], "paths": path_audit(run)}
    run = base / f"tree_grpo_lr{sizes['lr_sweep'][0]}"
    data, wall = run_json(
        [PY, str(ROOT / "bench" / "lucky_paths.py"), "--run", str(run), "--checkpoint", ckpt],
        base / "lucky_paths.log",
    )
    return {"lr_sweep": sweep, "lucky_paths": {**data, "run": run.name, "wall_s": wall}}


def path_audit(run: Path) -> dict[str, int]:
    """Terminal leaves of a run's search trees (all rounds) by outcome and by whether every ``a<op>b=c`` step is
    arithmetically right (``ArithTask.step_is_correct``): ``correct_dirty`` counts "lucky" paths, rewarded
    although a step is wrong."""
    from lucky_paths import leaf_kinds

    counts = dict.fromkeys(("correct_clean", "correct_dirty", "wrong_clean", "wrong_dirty"), 0)
    for trees in sorted(run.glob("round-*/trees.jsonl")):
        for kind in leaf_kinds(trees).values():
            counts[kind] += 1
    return counts


def run_mamba(root: Path, sizes: dict[str, Any], seed: int) -> dict[str, Any]:
    """Tiny Mamba, parameter-matched to the Llama: time one SFT forward+backward on this CPU (child process).

    Without the ``mamba_ssm`` / ``causal_conv1d`` kernels transformers runs a pure-PyTorch scan (mambapy's parallel
    scan for ``tiny:mamba``), still several times slower than the Llama step on CPU; the warm start (its own, like
    each Llama seed's) + tree-GRPO rounds run only when one step is fast enough for the mode's budget
    (``mamba_max_step_s``), else the page reports the measured step time.
    """
    code = (
        "import json,time,torch\nfrom thinktree.trainer.tiny import build_tiny_model\nout={}\n"
        f"for arch,sz in (('llama',{LLAMA_SIZES!r}),('mamba',{MAMBA_SIZES!r})):\n"
        f"    m,_=build_tiny_model(arch,seed={seed},**sz); x=torch.randint(4,90,(4,64))\n"
        "    t=time.perf_counter(); m(input_ids=x,labels=x).loss.backward()\n"
        "    out[arch]={'step_s':time.perf_counter()-t,'params':sum(p.numel() for p in m.parameters())}\n"
        "print(json.dumps(out))\n"
    )
    data, wall = run_json(
        [PY, "-c", code], root / f"mamba_seed{seed}_probe.log", timeout=sizes["mamba_probe_timeout"]
    )
    res: dict[str, Any] = {
        "params": data["mamba"]["params"], "llama_params": data["llama"]["params"], "sizes": MAMBA_SIZES,
        "llama_sizes": LLAMA_SIZES, "step_s": data["mamba"]["step_s"], "llama_step_s": data["llama"]["step_s"],
        "probe_batch": [4, 64], "ws_steps": sizes["ws_steps"], "max_step_s": sizes["mamba_max_step_s"],
    }  # fmt: skip
    if data["mamba"]["step_s"] > sizes["mamba_max_step_s"]:
        return res
    base, log = root / f"mamba_seed{seed}", root / f"mamba_seed{seed}.log"
    mamba = [*common(sizes, seed), "model.policy=tiny:mamba", f"model.tiny_sizes={_flow(MAMBA_SIZES)}"]
    ws = train(
        base / "warm_start", [*mamba, "rounds.num_rounds=0", "rounds.warm_start.algo=sft",
                              f"rounds.warm_start.steps={sizes['ws_steps']}"], log,
    )  # fmt: skip
    from_ckpt = [*common(sizes, seed), f"model.policy={run_checkpoint(base / 'warm_start', ws['warm_start']['checkpoint'])}",
                 "rounds.warm_start.algo=none", f"rounds.num_rounds={sizes['rounds']}"]  # fmt: skip
    s = train(base / "tree_grpo", [*from_ckpt, *METHODS["tree_grpo"]], log)
    return {**res, "curve": curve(s), "wall_s": s["wall_s"], "warm_start_time_s": ws["warm_start"]["time_s"]}


def reach_ratio(tree: list[dict], iid: list[dict]) -> dict[str, Any]:
    """Cumulative tokens tree-GRPO needed to reach i.i.d. GRPO's final accuracy, as a fraction of i.i.d.'s total."""
    target, iid_total = iid[-1]["accuracy"], iid[-1]["cum_tokens"]
    for row in tree[1:]:
        if row["accuracy"] >= target:
            return {"target": target, "tree_tokens": row["cum_tokens"], "iid_tokens": iid_total,
                    "ratio": row["cum_tokens"] / max(1, iid_total)}  # fmt: skip
    return {"target": target, "tree_tokens": None, "iid_tokens": iid_total, "ratio": None}
