"""Baselines: same return type and Budget accounting as MCTS; answer selection; trees they build."""

import numpy as np
import pytest

from thinktree.search import MCTSConfig, SearchResult, Trajectory, best_of_n, greedy, search, step_beam
from thinktree.search.baselines import mean_step_logprob
from thinktree.search.toy import ArithmeticWorld, NeverEndingWorld, RandomTreeWorld, ToyWorld, make_step
from thinktree.search.tree import ROOT


def tree_tokens(tree):
    return sum(len(n.step.token_ids) for n in tree.nodes[1:])


def prompts(n=3):
    return [Trajectory(f"prompt {i}", key=i) for i in range(n)]


def test_greedy_chain_and_budget():
    world = ArithmeticWorld(greedy=True)
    results = greedy(
        prompts(), world, world.outcome_fn, rng=np.random.default_rng(0), answer_fn=world.answer_fn
    )
    for r in results:
        assert isinstance(r, SearchResult) and r.method == "greedy" and r.stop_reason == "done"
        assert len(r.tree) == 4 and r.tree.path(r.node) == [0, 1, 2, 3]
        assert (r.completion, r.answer, r.reward) == ("+3+3+3=9", "9", 0.0)
        assert r.budget.generated_tokens == tree_tokens(r.tree) == 8
        assert r.budget.rollout_tokens == 0 and r.budget.outcome_evals == 1
        assert r.budget.proposer_calls == 3 and r.budget.prefixes == 3
        assert r.tree.nodes[ROOT].visits == 1  # the reward is backed up once
    assert world.stats["calls"] == 3  # one batched call per step for all three prompts
    assert results[0].budget.backend["calls"] == 3


def test_best_of_n_budget_is_sum_of_step_tokens():
    world = RandomTreeWorld(seed=4, eos_prob=0.4)
    results = best_of_n(
        prompts(),
        world,
        world.outcome_fn,
        n=6,
        rng=np.random.default_rng(0),
        max_depth=5,
        answer_fn=world.answer_fn,
    )
    for r in results:
        assert len(r.tree.nodes[ROOT].children) == 6  # n chains, never merged
        assert len(r.tree.terminal_leaves()) == 6
        assert r.budget.generated_tokens == tree_tokens(r.tree)
        assert r.tree.nodes[ROOT].visits == 6
        assert all(r.tree.nodes[i].reward is not None for i in r.tree.terminal_leaves())


class FixedAnswers(ToyWorld):
    """Every chain is one EOS step " =a", with a drawn (per seed) from ``answers``; reward 1 iff a == "7"."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def children(self, prefix, num_children, rng):
        return [
            make_step(f" ={self.answers[int(rng.integers(len(self.answers)))]}", 0.5, eos=True)
        ] * num_children

    def reward(self, trajectory):
        return float(trajectory.completion.strip() == "=7")

    def value(self, trajectory):
        return 0.9 if trajectory.completion.strip() == "=3" else 0.1


def test_best_of_n_majority_vote():
    world = FixedAnswers(["7", "7", "7", "3", "5"])
    [r] = best_of_n(
        prompts(1), world, world.outcome_fn, n=15, rng=np.random.default_rng(0), answer_fn=world.answer_fn
    )
    answers = [world.answer_fn(r.tree.trajectory(i).completion) for i in r.tree.terminal_leaves()]
    assert answers.count("7") > max(answers.count("3"), answers.count("5"))
    assert r.answer == "7" and r.reward == 1.0 and r.method == "best_of_n/majority"


def test_best_of_n_value_selections():
    world = FixedAnswers(["7", "7", "7", "3", "5"])
    kwargs = dict(n=15, rng=np.random.default_rng(0), value_fn=world.value_fn, answer_fn=world.answer_fn)
    [best] = best_of_n(prompts(1), world, world.outcome_fn, answer_selection="best_value", **kwargs)
    assert best.answer == "3" and best.tree.nodes[best.node].extra["value_fn"] == 0.9
    kwargs["rng"] = np.random.default_rng(0)
    [weighted] = best_of_n(prompts(1), world, world.outcome_fn, answer_selection="weighted_vote", **kwargs)
    leaves = weighted.tree.terminal_leaves()
    n3 = sum(weighted.tree.trajectory(i).completion == " =3" for i in leaves)
    n7 = sum(weighted.tree.trajectory(i).completion == " =7" for i in leaves)
    assert weighted.answer == ("3" if 0.9 * n3 > 0.1 * n7 else "7")
    assert weighted.budget.value_evals == 15


def test_step_beam_with_value_fn_finds_target():
    world = ArithmeticWorld()
    results = step_beam(
        prompts(),
        world,
        world.outcome_fn,
        rng=np.random.default_rng(0),
        beam_width=2,
        expansions=4,
        value_fn=world.value_fn,
        answer_fn=world.answer_fn,
    )
    for r in results:
        assert r.answer == "4" and r.reward == 1.0 and r.method == "step_beam"
        assert r.tree.nodes[r.node].extra["beam_kept"]
        assert r.budget.generated_tokens == tree_tokens(r.tree)  # enumerating world: nothing merged
        kept_per_depth = {}
        for n in r.tree.nodes[1:]:
            kept_per_depth[n.depth] = kept_per_depth.get(n.depth, 0) + bool(n.extra.get("beam_kept"))
        assert all(k <= 2 for k in kept_per_depth.values())


def test_step_beam_by_logprob():
    world = ArithmeticWorld()
    [r] = step_beam(
        prompts(1),
        world,
        world.outcome_fn,
        rng=np.random.default_rng(0),
        beam_width=1,
        expansions=4,
        answer_fn=world.answer_fn,
    )
    assert r.completion == "+3+3+3=9"  # the highest-prior chain
    assert r.tree.nodes[r.node].extra["beam_score"] == pytest.approx(
        mean_step_logprob(r.tree.trajectory(r.node))
    )


def test_baselines_bounded_by_max_depth():
    world = NeverEndingWorld()
    [g] = greedy(prompts(1), world, world.outcome_fn, rng=np.random.default_rng(0), max_depth=4)
    assert len(g.tree) == 5 and g.tree.nodes[g.node].terminal and g.reward == 0.0
    [b] = step_beam(prompts(1), world, world.outcome_fn, rng=np.random.default_rng(0), max_depth=3)
    assert max(n.depth for n in b.tree.nodes) == 3


def test_same_budget_fields_as_mcts():
    world = ArithmeticWorld()
    [m] = search(
        prompts(1),
        world,
        world.outcome_fn,
        config=MCTSConfig(num_simulations=4),
        rng=np.random.default_rng(0),
    )
    [g] = greedy(prompts(1), world, world.outcome_fn, rng=np.random.default_rng(0))
    assert m.budget.to_dict().keys() == g.budget.to_dict().keys()
    assert m.summary().keys() == g.summary().keys()


def test_baseline_bad_arguments():
    world = ArithmeticWorld()
    with pytest.raises(ValueError, match="n must be a positive int"):
        best_of_n(
            prompts(1), world, world.outcome_fn, n=0, rng=np.random.default_rng(0), answer_fn=world.answer_fn
        )
    with pytest.raises(ValueError, match="needs a value_fn"):
        best_of_n(
            prompts(1),
            world,
            world.outcome_fn,
            n=2,
            rng=np.random.default_rng(0),
            answer_selection="best_value",
        )
    with pytest.raises(ValueError, match="needs an answer_fn"):
        best_of_n(prompts(1), world, world.outcome_fn, n=2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown answer_selection"):
        best_of_n(
            prompts(1), world, world.outcome_fn, n=2, rng=np.random.default_rng(0), answer_selection="x"
        )
    with pytest.raises(ValueError, match="beam_width"):
        step_beam(prompts(1), world, world.outcome_fn, rng=np.random.default_rng(0), beam_width=0)
    with pytest.raises(ValueError, match="empty prompt list"):
        greedy([], world, world.outcome_fn, rng=np.random.default_rng(0))
