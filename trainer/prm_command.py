"""``thinktree prm``: train a process reward model from stored search trees, save it, report held-out step metrics.

    thinktree prm --trees 'runs/quickstart/round-*/trees.jsonl' --policy runs/quickstart/warm_start/checkpoint \\
                  --out runs/prm [--labels math_shepherd|rest|ppm] [--features hidden+logprob|hidden] \\
                  [--train-backbone] [--steps 1000] [--learning-rate 3e-3]

What it does: reads every tree of the given tree stores (``TreeStore`` JSONL, as ``thinktree train`` / ``search``
write them), keeps the last ``--held-out`` fraction of the trees aside, labels the rest (Math-Shepherd Monte-Carlo
labels → BCE, ReST-MCTS* value targets → MSE, or rStar-Math preference pairs → Bradley-Terry; see
:mod:`thinktree.rewards.labels`), trains a :class:`~thinktree.rewards.prm.ProcessRewardModel` on a copy of
``--policy`` (frozen backbone unless ``--train-backbone``; :func:`~thinktree.trainer.algos.prm.train_prm`), saves it to
``--out`` (a directory ``--prm`` of ``thinktree eval`` / ``ablate`` accepts) and writes ``<out>/prm_metrics.json``:
label counts (trees with no terminal leaf, all-correct and all-wrong trees are counted, not errors) and step AUC /
accuracy on the held-out trees' Math-Shepherd hard labels. Defaults are those measured best on arith in
``bench/prm_rerank.py`` (its docstring has the numbers). Runs under ``accelerate launch`` too (the training is).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from pathlib import Path

from thinktree.rewards.labels import math_shepherd_labels, ppm_pairs, rest_value_labels
from thinktree.rewards.prm import FEATURES, PRMValueFn, ProcessRewardModel
from thinktree.search.store import TreeStore
from thinktree.trainer.algos.prm import PRMSettings, save_prm_checkpoint, step_metrics, train_prm
from thinktree.trainer.models import load_policy

__all__ = ["LABELS", "prm_main"]

LABELS = {
    "math_shepherd": ("bce", lambda trees: math_shepherd_labels(trees, kind="hard")),
    "rest": ("mse", rest_value_labels),
    "ppm": ("bt", ppm_pairs),
}
"""Label kind → (training objective, label function over trees)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinktree prm", description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", action="append", required=True, help="tree store path or glob (repeatable)")
    p.add_argument("--policy", required=True, help="policy checkpoint / spec the PRM backbone is copied from")
    p.add_argument("--out", required=True, help="directory to save the PRM to")
    p.add_argument("--labels", choices=sorted(LABELS), default="math_shepherd")
    p.add_argument("--features", choices=sorted(FEATURES), default="hidden+logprob")
    p.add_argument(
        "--train-backbone", action="store_true", help="fine-tune the backbone (default: head only)"
    )
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16, help="records (or pairs) per device per step")
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of the trees kept for evaluation")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load_trees(patterns: list[str]) -> list:
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or [pat])})
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no tree store at {missing[0]}")
    trees = [t for p in paths for t in TreeStore(p).load()]
    if not trees:
        raise ValueError(f"the tree stores {paths} hold no trees")
    return trees


def prm_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 0.0 <= args.held_out < 1.0:
        raise ValueError(f"--held-out must be in [0, 1), got {args.held_out}")
    start = time.perf_counter()
    trees = _load_trees(args.trees)
    cut = len(trees) - int(round(args.held_out * len(trees)))
    objective, label_fn = LABELS[args.labels]
    records, stats = label_fn(trees[:cut])
    if not records:
        raise ValueError(f"no {args.labels} labels in {cut} training trees (label counts: {stats})")
    model, tokenizer = load_policy(args.policy, padding_side=None)
    prm = ProcessRewardModel(model, base=args.policy, features=args.features)
    settings = PRMSettings(
        objective=objective, steps=args.steps, learning_rate=args.learning_rate,
        per_device_batch_size=args.batch_size, head_only=not args.train_backbone, seed=args.seed,
    )  # fmt: skip
    fit = train_prm(prm, tokenizer, records, settings)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher every rank trains; the first one saves
        return 0
    out = save_prm_checkpoint(prm, tokenizer, args.out)
    held, held_stats = math_shepherd_labels(trees[cut:], kind="hard") if cut < len(trees) else ([], {})
    metrics = {
        "trees": len(trees), "train_trees": cut, "labels": args.labels, "label_stats": stats,
        "held_out_stats": held_stats, "fit": {k: v for k, v in fit.items() if k != "losses"},
        "held_out": step_metrics(PRMValueFn(prm, tokenizer), held) if held else None,
        "wall_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    (out / "prm_metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    print(json.dumps(metrics, default=str))
    print(f"saved the PRM to {out}")
    return 0
