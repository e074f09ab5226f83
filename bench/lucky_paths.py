"""Why outcome-rewarded rounds barely lift the tiny policy: one round's tree-GRPO records, retrained from the same
start under controlled advantages.

Input: a finished ``thinktree train`` run that used ``train.algo=grpo`` (its ``config.yaml`` and a round's
``signals.jsonl`` + ``trees.jsonl``) and the checkpoint that round started from. The round's GRPO update (the
run's ``train`` settings, e.g. one pass at its learning rate) is redone from that checkpoint with the per-token
advantages replaced by:

* ``real``  — the advantages the run compiled (what the round did);
* ``zero``  — all 0: the control (no gradient; accuracy must not move);
* ``clean`` — +1 on every token of a path that reached the right answer with every ``a<op>b=c`` step right
  (``ArithTask.step_is_correct``), else 0 (rejection fine-tuning on sound paths);
* ``lucky`` — +1 on a path that reached the right answer through a wrong step, else 0.

Each is scored by held-out greedy pass@1 on the run's eval split (as the round's eval). Output: a table and one JSON
line. Run: ``python bench/lucky_paths.py --run runs/x/tree_grpo --checkpoint CKPT [--round 1]
[train.learning_rate=1e-4 ...]`` (about 1 min on a CPU core for the quickstart sizes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from thinktree.rewards import get_task
from thinktree.rewards.tasks.arith import ArithTask
from thinktree.trainer.algos.grpo import train_grpo
from thinktree.trainer.config import load_config
from thinktree.trainer.evaluate import evaluate_policy
from thinktree.trainer.models import load_policy
from thinktree.trainer.searching import make_prompts


def leaf_kinds(trees_jsonl: Path) -> dict[tuple, str]:
    """``(tree key, terminal leaf)`` → ``correct_clean`` / ``correct_dirty`` / ``wrong_clean`` / ``wrong_dirty``:
    the outcome, and whether every ``a<op>b=c`` step on the path is arithmetically right
    (``ArithTask.step_is_correct``). ``correct_dirty`` paths are the "lucky" ones."""
    kinds = {}
    for line in trees_jsonl.read_text().splitlines():
        d = json.loads(line)
        nodes = d["tree"]["nodes"]
        for i, node in enumerate(nodes):
            if not node["terminal"]:
                continue
            clean, j = True, i
            while j >= 0 and nodes[j]["step"] is not None:
                clean = clean and ArithTask.step_is_correct(nodes[j]["step"]["text"]) is not False
                j = nodes[j]["parent"]
            good = (node["reward"] or 0.0) >= 0.5
            kinds[(d["key"], i)] = f"{'correct' if good else 'wrong'}_{'clean' if clean else 'dirty'}"
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="output dir of a finished grpo run")
    ap.add_argument("--checkpoint", required=True, help="the checkpoint the round started from")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="recipe overrides on top of the run's config.yaml")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml", args.overrides)
    rdir = run / f"round-{args.round:02d}"
    records = [json.loads(x) for x in (rdir / "signals.jsonl").read_text().splitlines()]
    kinds = leaf_kinds(rdir / "trees.jsonl")
    named = {"correct_clean": "clean", "correct_dirty": "lucky"}
    kind = [named.get(kinds.get((r["key"], r["node"]), ""), "wrong") for r in records]
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    rows = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    variants = {
        "real": lambda r, k: r["advantages"],
        "zero": lambda r, k: [0.0] * len(r["advantages"]),
        "clean": lambda r, k: [float(k == "clean")] * len(r["advantages"]),
        "lucky": lambda r, k: [float(k == "lucky")] * len(r["advantages"]),
    }
    out: dict = {"records": len(records), "paths": {k: kind.count(k) for k in ("clean", "lucky", "wrong")}}
    out["learning_rate"], out["round"] = cfg.train.learning_rate, args.round
    start = time.perf_counter()
    for name, fn in variants.items():
        model, tok = load_policy(args.checkpoint)
        prompts = make_prompts(task, rows, tok, cfg.model.use_chat_template)
        if name == "real":
            out["start"] = evaluate_policy(model, tok, task, prompts, cfg, methods=["greedy"])["greedy"][
                "accuracy"
            ]
        recs = [dict(r, advantages=fn(r, k)) for r, k in zip(records, kind)]
        with tempfile.TemporaryDirectory(prefix="lucky_paths_") as d:
            _, metrics = train_grpo(model, tok, recs, cfg.train, seed=cfg.seed, checkpoint_dir=d)
        acc = evaluate_policy(model, tok, task, prompts, cfg, methods=["greedy"])["greedy"]["accuracy"]
        out[name] = {"accuracy": acc, "steps": len(metrics)}
        print(
            f"{name:6} greedy pass@1 {100 * acc:5.1f} % (start {100 * out['start']:.1f} %, {len(metrics)} steps)"
        )
    out["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
