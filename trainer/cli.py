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

Every error a user can cause (a bad recipe, override, file, model or data: :data:`USER_ERRORS`) is one line on
stderr, ``thinktree <command>: <message>``, and exit status 2; ``--debug`` anywhere on the command line shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")
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


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, OSError)
"""What a user can cause (a bad recipe or override, a missing or malformed file, a model or data that does not fit):
reported as one line and exit status 2. Anything else is a bug and keeps its traceback."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line messages, e.g. YAML errors, joined with `` | ``)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " | ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (:data:`USER_ERRORS`) prints ``thinktree <command>: <message>`` on one line and
    returns 2 (``--debug`` anywhere on the line re-raises it instead, with its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        return _dispatch(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"thinktree{' ' + command if command else ''}: {one_line(e)}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["view"]:  # the viewer takes no recipe: it reads a tree store
        from thinktree.trainer.view import view_main

        return view_main(argv[1:])
    if argv[:1] == ["prm"]:  # reads tree stores, no recipe
        from thinktree.trainer.prm_command import prm_main

        return prm_main(argv[1:])
    args, overrides = _parser().parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    if args.command in ("search", "eval"):  # data notices (e.g. how a single data file was split) are INFO
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "train":
        from thinktree.trainer.rounds import run_train

        run_train(cfg)
    elif args.command == "search":
        from thinktree.trainer.searching import run_search_command

        run_search_command(cfg, split=args.split, limit=args.limit)
    elif args.command == "eval":
        from thinktree.trainer.evaluate import run_eval_command

        methods = args.methods.split(",") if args.methods else None
        run_eval_command(
            cfg, checkpoint=args.checkpoint, split=args.split, methods=methods, prm=args.prm, out=args.out
        )
    elif args.command == "ablate":
        from thinktree.trainer.ablate import run_ablate_command

        run_ablate_command(cfg, checkpoint=args.checkpoint, prm=args.prm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
