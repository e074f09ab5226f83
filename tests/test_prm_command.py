"""``thinktree prm``: trees from stores → labels → a saved PRM with held-out metrics; bad input gives clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from thinktree.rewards import get_task
from thinktree.rewards.prm import load_prm
from thinktree.search.store import TreeStore
from thinktree.trainer.cli import main
from thinktree.trainer.config import SearchConfig
from thinktree.trainer.models import save_policy
from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method
from thinktree.trainer.tiny import build_tiny_model


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random policy saved as a checkpoint and two tree stores of its MCTS on arith."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("prm_cmd")
    model, tok = build_tiny_model("llama", seed=0, hidden_size=32)
    save_policy(model, tok, root / "policy")
    task = get_task("arith", ops=(2, 2), digits=1)
    cfg = SearchConfig(
        num_simulations=4, num_children=2, max_depth=3, max_step_tokens=8, evaluation="rollout"
    )
    rows = task.load("train", n=8, seed=0)
    results = run_method(
        "mcts", make_prompts(task, rows), make_proposer(model, tok, cfg), make_outcome_fn(task), cfg,
        np.random.default_rng(0), answer_fn=task.extract_answer,
    )  # fmt: skip
    for i, half in enumerate((results[:4], results[4:])):
        store = TreeStore(root / f"round-{i:02d}" / "trees.jsonl")
        for r in half:
            store.append(r)
    return root, root / "policy"


def test_prm_command_trains_saves_and_reports(stores, capsys):
    root, policy = stores
    out = root / "prm"
    argv = ["prm", "--trees", str(root / "round-*" / "trees.jsonl"), "--policy", str(policy), "--out", str(out),
            "--steps", "3", "--held-out", "0.25"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "prm_metrics.json").read_text())
    assert metrics["trees"] == 8 and metrics["train_trees"] == 6
    assert metrics["fit"]["steps"] == 3 and metrics["label_stats"]["trees"] == 6
    assert metrics["held_out"]["n_steps"] > 0
    prm, tok = load_prm(out)
    assert prm.features == "hidden+logprob" and tok is not None
    assert "saved the PRM to" in capsys.readouterr().out


def test_prm_command_bad_input(stores, tmp_path, capsys):
    root, policy = stores
    base = ["--policy", str(policy), "--out", str(tmp_path / "p"), "--steps", "1"]
    assert main(["prm", "--trees", str(tmp_path / "missing.jsonl"), *base]) == 2
    assert "no tree store at" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["prm", "--trees", str(tmp_path / "empty.jsonl"), *base]) == 2
    assert "hold no trees" in capsys.readouterr().err
    # a random policy gets every answer wrong: all-wrong trees have no preference pairs → a clear error
    assert main(["prm", "--trees", str(root / "round-00" / "trees.jsonl"), "--labels", "ppm", *base]) == 2
    err = capsys.readouterr().err
    assert "no ppm labels" in err and "all_wrong" in err
