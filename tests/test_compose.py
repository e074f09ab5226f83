"""Reward composition: registered shaping rewards, weighted sums, per-component metrics, TRL plumbing."""

from __future__ import annotations

import pytest

from thinktree.rewards import REWARDS
from thinktree.rewards.compose import ComposedReward, compose_rewards, format_reward, make_length_penalty

GOOD = "3*2=6\n1+6=7\nAnswer: 7"
NO_ANSWER = "3*2=6\n1+6=7"


def test_format_and_length_penalty_are_registered():
    assert REWARDS["format"] is format_reward
    assert "length_penalty" in REWARDS


def test_format_reward():
    chat = [{"role": "assistant", "content": "x\nAnswer: 3\n\n"}]
    got = format_reward([GOOD, NO_ANSWER, "Answer: 7\nmore text", "", "Answer:   ", chat])
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_length_penalty_chars_and_tokens():
    pen = make_length_penalty(budget=10, scale=10, cap=1.0)
    assert pen(["x" * 5, "x" * 10, "x" * 15, "x" * 40]) == [0.0, 0.0, -0.5, -1.0]
    tok_pen = make_length_penalty(budget=2, unit="tokens", scale=2)
    assert tok_pen(["a", "b"], completion_ids=[[1, 2, 3], [1]]) == [-0.5, 0.0]
    with pytest.raises(ValueError, match="completion_ids"):
        tok_pen(["a"])

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    assert make_length_penalty(budget=1, unit="tokens", tokenizer=Tok())(["a b c"]) == [-1.0]
    with pytest.raises(ValueError):
        make_length_penalty(unit="words")


def test_weighted_sum_and_metrics():
    reward = compose_rewards(
        {"outcome": 1.0, "format": 0.5, "length_penalty": {"weight": 2.0, "budget": 10}}, task="arith"
    )
    comps = [GOOD, NO_ANSWER, "Answer: 8"]
    totals = reward(comps, answer=["7", "7", "7"])
    outcome = [1.0, 1.0, 0.0]  # NO_ANSWER's last integer is 7
    fmt = [1.0, 0.0, 1.0]
    length = [-min(1.0, max(0, len(c) - 10) / 10) for c in comps]
    want = [o + 0.5 * f + 2.0 * lp for o, f, lp in zip(outcome, fmt, length)]
    assert totals == pytest.approx(want)
    assert reward.components["outcome"] == outcome and reward.components["format"] == fmt
    m = reward.metrics()
    assert m["reward/outcome"] == pytest.approx(2 / 3) and m["reward/format"] == pytest.approx(2 / 3)
    assert m["reward/length_penalty"] == pytest.approx(sum(length) / 3)
    assert m["reward/total"] == pytest.approx(sum(want) / 3)


def test_none_components_are_skipped():
    reward = compose_rewards({"arith": 1.0, "format": 0.25})
    totals = reward([GOOD, GOOD], answer=["7", None])  # no reference answer → arith gives None
    assert totals == [1.25, 0.25]
    assert reward.metrics()["reward/arith"] == 1.0  # the None is left out of the mean
    only_none = compose_rewards({"arith": 1.0})
    assert only_none([GOOD], answer=[None]) == [None]


def test_bad_compositions_raise():
    with pytest.raises(ValueError, match="needs task"):
        compose_rewards({"outcome": 1.0})
    with pytest.raises(ValueError, match="unknown reward"):
        compose_rewards({"nope": 1.0})
    with pytest.raises(ValueError, match="takes no options"):
        compose_rewards({"format": {"weight": 1.0, "budget": 3}})
    with pytest.raises(ValueError, match="weight must be a number"):
        compose_rewards({"format": "high"})
    with pytest.raises(ValueError, match="empty"):
        ComposedReward({})


def test_trl_reward_funcs_keep_names_and_weights():
    reward = compose_rewards({"outcome": 1.0, "format": 0.1}, task="arith")
    funcs, weights = reward.trl_reward_funcs()
    assert [f.__name__ for f in funcs] == ["outcome", "format"] and weights == [1.0, 0.1]
    assert funcs[0]([GOOD], answer=["7"]) == [1.0] and funcs[1]([NO_ANSWER]) == [0.0]
