"""The ``thinktree`` command line.

    thinktree train  --config recipes/quickstart.yaml [section.field=value ...]
    thinktree search --config recipes/quickstart.yaml [--split test] [section.field=value ...]
    thinktree eval   --config recipes/quickstart.yaml [--checkpoint DIR] [--methods greedy,mcts] [--prm DIR]
    thinktree view   runs/X/round-01/trees.jsonl [--out trees.html] [--signals signals.jsonl]
    thinktree ablate --config recipes/ablate_arith.yaml [--checkpoint DIR] [--prm DIR]
    thinktree prm    --trees 'runs/X/round-*/trees.jsonl' --policy DIR --out DIR [--labels math_shepherd|rest|ppm]

Also runs under accelerate: ``accelerate launch -m thinktree.trainer.cli train --config recipes/X.yaml``.
Any config field can be overridden after the options, as ``search.num_simulations=32`` or
``--search.num_simulations 32``; unknown fields are an error that names them.
"""

from __future__ import annotations

import argparse
import sys

from thinktree.trainer.config import ConfigError, load_config

COMMANDS = {
    "train": "run a recipe: warm start, rounds of search → signals → training, evaluation",
    "search": "search a task split with the recipe's policy and method; write trees and a summary",
    "eval": "accuracy of a policy or checkpoint under named search methods, with tokens and time",
    "ablate": "a grid over search settings on the same prompts: results table, CSV and accuracy-vs-tokens plot",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="thinktree", description="MCTS reasoning trainer")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "view", help="render a tree store (trees.jsonl) as a self-contained HTML page", add_help=False
    )
    sub.add_parser("prm", help="train a process reward model from stored search trees", add_help=False)
    for name, help_text in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("--config", "-c", default=None, help="recipe YAML (defaults apply when omitted)")
        if name == "search":
            s.add_argument("--split", default="test", choices=["train", "test"], help="task split to search")
            s.add_argument("--limit", type=int, default=None, help="search at most this many prompts")
        if name == "eval":
            s.add_argument(
                "--split", default="test", choices=["train", "test"], help="task split to evaluate"
            )
            s.add_argument(
                "--checkpoint", default=None, help="model directory to evaluate (default: recipe's)"
            )
            s.add_argument("--methods", default=None, help="comma-separated methods (default: eval.methods)")
            s.add_argument("--prm", default=None, help="process reward model directory (value function)")
            s.add_argument(
                "--out", default=None, help="output JSON (default: <output.dir>/eval-<split>.json)"
            )
        if name == "ablate":
            s.add_argument("--checkpoint", default=None, help="policy directory (default: recipe's)")
            s.add_argument("--prm", default=None, help="process reward model directory (default: ablate.prm)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["view"]:  # the viewer takes no recipe: it reads a tree store
        from thinktree.trainer.view import view_main

        try:
            return view_main(argv[1:])
        except FileNotFoundError as e:
            print(f"thinktree view: {e}", file=sys.stderr)
            return 2
    if argv[:1] == ["prm"]:  # reads tree stores, no recipe
        from thinktree.trainer.prm_command import prm_main

        try:
            return prm_main(argv[1:])
        except (FileNotFoundError, ValueError) as e:
            print(f"thinktree prm: {e}", file=sys.stderr)
            return 2
    args, overrides = _parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"thinktree: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from thinktree.trainer.rounds import run_train

        run_train(cfg)
    elif args.command == "search":
        from thinktree.trainer.searching import run_search_command

        run_search_command(cfg, split=args.split, limit=args.limit)
    elif args.command == "eval":
        from thinktree.trainer.evaluate import run_eval_command

        methods = args.methods.split(",") if args.methods else None
        try:
            run_eval_command(
                cfg, checkpoint=args.checkpoint, split=args.split, methods=methods, prm=args.prm, out=args.out
            )
        except ConfigError as e:
            print(f"thinktree eval: {e}", file=sys.stderr)
            return 2
    elif args.command == "ablate":
        from thinktree.trainer.ablate import run_ablate_command

        try:
            run_ablate_command(cfg, checkpoint=args.checkpoint, prm=args.prm)
        except ConfigError as e:
            print(f"thinktree ablate: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
