"""The learn recipe, shortened, learns: its greedy gain beats the random-reward control's (slow: a few minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinktree.trainer.config import load_config
from thinktree.trainer.rounds import run_train

ROOT = Path(__file__).resolve().parent.parent
SHORT = [
    "rounds.num_rounds=2",
    "rounds.prompts_per_round=512",
    "task.eval_size=128",
    "eval.methods=[greedy]",
    "output.report_to=[]",
]


@pytest.mark.slow
def test_shortened_learn_recipe_beats_the_random_reward_control(tmp_path):
    gains = {}
    for arm in ("none", "random_reward"):
        cfg = load_config(
            ROOT / "recipes" / "learn.yaml", [*SHORT, f"train.control={arm}", f"output.dir={tmp_path / arm}"]
        )
        summary = run_train(cfg)
        gains[arm] = summary["accuracy_after"]["greedy"] - summary["accuracy_before"]["greedy"]
    # same seed, same warm start: the arms differ only in the leaf rewards the rounds train on
    assert gains["none"] > 0.0, gains
    assert gains["none"] > gains["random_reward"] + 0.05, gains
