"""Property tests: MCTS invariants over random toy trees and random configurations (hypothesis)."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinktree.search import MCTSConfig, Trajectory, search
from thinktree.search.toy import RandomTreeWorld
from thinktree.search.tree import ROOT, Tree

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

configs = st.builds(
    MCTSConfig,
    num_simulations=st.integers(1, 16),
    num_children=st.integers(1, 4),
    c_puct=st.sampled_from([0.0, 0.5, 1.25, 3.0]),
    pb_c_base=st.sampled_from([None, 10.0]),
    select=st.sampled_from(["puct", "uct"]),
    dirichlet_fraction=st.sampled_from([0.0, 0.25]),
    fill_q=st.sampled_from(["parent", "zero"]),
    in_flight=st.integers(1, 4),
    virtual_loss_value=st.sampled_from([0.0, 0.5]),
    evaluation=st.sampled_from(["rollout", "value", "mixed"]),
    num_rollouts=st.integers(1, 2),
    backup=st.sampled_from(["mean", "max"]),
    max_depth=st.integers(1, 5),
    answer_selection=st.sampled_from(["visits", "q", "majority", "weighted_vote"]),
)
worlds = st.builds(
    RandomTreeWorld,
    seed=st.integers(0, 2**16),
    vocab=st.integers(1, 5),
    eos_prob=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    binary=st.booleans(),
)


def run(world, config, seed, num_prompts=2, progress=None):
    prompts = [Trajectory(f"prompt {i}", key=i) for i in range(num_prompts)]
    return search(
        prompts,
        world,
        world.outcome_fn,
        config=config,
        rng=np.random.default_rng(seed),
        value_fn=world.value_fn,
        answer_fn=world.answer_fn,
        progress=progress,
    )


def check_invariants(tree: Tree, config: MCTSConfig, sims: int) -> None:
    nodes = tree.nodes
    assert nodes[ROOT].visits == sims + 1
    assert nodes[ROOT].evaluations == 1
    for i, n in enumerate(nodes):
        assert n.visits == n.evaluations + sum(nodes[c].visits for c in n.children)
        assert n.virtual_loss == 0
        assert n.depth <= config.max_depth
        assert not (n.terminal and n.children)
        if n.visits:
            assert 0.0 <= tree.q(i) <= 1.0
            assert 0.0 <= n.value <= 1.0
        if n.terminal and n.visits:
            assert n.reward is not None and n.value == n.reward
        if n.depth == config.max_depth:
            assert n.terminal
        if i != ROOT:
            assert i > n.parent and i in nodes[n.parent].children
            assert tree.trajectory(i) == tree.trajectory(n.parent).extend(n.step)
        if n.children:
            assert abs(sum(nodes[c].prior for c in n.children) - 1.0) < 1e-9
            texts = [nodes[c].step.text for c in n.children]
            assert len(texts) == len(set(texts))  # duplicates merged
        n_rollouts = config.num_rollouts if config.evaluation != "value" else 0
        assert len(n.rollout_rewards) == (0 if n.terminal else n.evaluations * n_rollouts)
    if config.backup == "max" and nodes[ROOT].visits:
        assert tree.q(ROOT) == max(n.value for n in nodes if n.evaluations)


@PROPS
@given(world=worlds, config=configs, seed=st.integers(0, 2**32 - 1))
def test_invariants_hold(world, config, seed):
    waves = []

    def progress(info):
        waves.append(info["wave"])
        for tree in info["trees"]:  # virtual loss fully removed after every wave
            assert all(n.virtual_loss == 0 for n in tree.nodes)

    results = run(world, config, seed, progress=progress)
    assert waves == list(range(1, len(waves) + 1))
    for r in results:
        check_invariants(r.tree, config, r.num_simulations)
        assert r.num_simulations <= config.num_simulations
        if r.num_simulations < config.num_simulations:
            assert r.stop_reason == "solved"
        assert 0 <= r.node < len(r.tree)
        assert r.completion == r.tree.trajectory(r.node).completion
        assert r.budget.generated_tokens >= r.budget.rollout_tokens >= 0


@PROPS
@given(world=worlds, config=configs, seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_json(world, config, seed):
    first = [r.tree.to_json() for r in run(world, config, seed)]
    again = [r.tree.to_json() for r in run(world, config, seed)]
    assert first == again
    assert [Tree.from_json(j).to_json() for j in first] == first


def test_different_seeds_usually_differ():
    world = RandomTreeWorld(seed=7, vocab=5)
    config = MCTSConfig(num_simulations=8, num_children=3, max_depth=4)
    trees = {run(world, config, seed, num_prompts=1)[0].tree.to_json() for seed in range(10)}
    assert len(trees) >= 8
