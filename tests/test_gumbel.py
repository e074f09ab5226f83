"""Gumbel MuZero search (mctx-style tests): hand-computed Sequential Halving schedules and completed Q, the
deterministic interior rule, policy improvement with exact Q, determinism, batch and resume invariance, the
π′ signal compiler, and the CLI (eval / ablate) accepting method gumbel on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_ablate import TINY

from thinktree.search import MCTSConfig, Trajectory, TreeStore, search_resumable
from thinktree.search.gumbel import (
    completed_q,
    considered_visits,
    gumbel_search,
    gumbel_top_k,
    improved_policy,
    interior_select,
    root_action,
    sigma_q,
)
from thinktree.search.toy import RandomTreeWorld, ToyWorld, make_step
from thinktree.search.tree import ROOT, Tree
from thinktree.trainer.signals.improved_policy import (
    improved_policy_advantages,
    improved_policy_records,
    improved_policy_targets,
)


class DeepBandit(ToyWorld):
    """A k-armed bandit that never ends: the root's children are the arms ``"arm{i}"`` (prior ``priors[i]``, all
    arms in order when ``num_children == k``); below an arm every step is ``" ."`` (never EOS). ``value_fn`` is
    ``rewards[i]`` anywhere under arm i, so with evaluation="value" Q(arm i) = rewards[i] exactly after any number
    of visits, and the tree is never solved (the search runs its whole budget)."""

    def __init__(self, rewards, priors, root_value=0.5):
        super().__init__()
        self.rewards = [float(r) for r in rewards]
        self.priors = [p / sum(priors) for p in priors]
        self.root_value = root_value

    def children(self, prefix, num_children, rng):
        if prefix.steps:
            return [make_step(" .", 1.0)] * num_children
        k = len(self.rewards)
        picks = range(k) if num_children == k else rng.choice(k, size=num_children, p=self.priors)
        return [make_step(f"arm{int(i)}", self.priors[int(i)]) for i in picks]

    def value(self, trajectory):
        return self.root_value if not trajectory.steps else self.rewards[int(trajectory.steps[0].text[3:])]

    def reward(self, trajectory):
        return None


def run_bandit(rewards, priors, sims, seed=0, **config):
    """One Gumbel search on a DeepBandit; returns (the arm chosen by each simulation, in order; the result)."""
    world = DeepBandit(rewards, priors)
    cfg = MCTSConfig(num_simulations=sims, num_children=len(rewards), evaluation="value", **config)
    visits: list[list[int]] = []
    [result] = gumbel_search(
        [Trajectory("bandit")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(seed),
        value_fn=world.value_fn,
        progress=lambda info: visits.append(
            [info["trees"][0].nodes[c].visits for c in range(1, 1 + len(rewards))]
        ),
    )
    order = []
    before = [0] * len(rewards)
    for now in visits:
        order.extend(i for i in range(len(rewards)) for _ in range(now[i] - before[i]))
        before = now
    return order, result


def arm_visits(result):
    tree = result.tree
    return [tree.nodes[c].visits for c in tree.nodes[ROOT].children]


# -- Sequential Halving: the schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, expected",
    [
        # log2(4) = 2 phases. Phase 1: 4 children × max(1, 8 // (2·4)) = 1 visit each → 0 0 0 0.
        # Phase 2: 2 children × 8 // (2·2) = 2 visits each → 1 1 2 2.
        (4, 8, (0, 0, 0, 0, 1, 1, 2, 2)),
        # Phase 1: 4 × 16 // 8 = 2 visits → 0 0 0 0 1 1 1 1; phase 2: 2 × 16 // 4 = 4 visits → 2 2 3 3 4 4 5 5.
        (4, 16, (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5)),
        # ceil(log2 3) = 2. Phase 1: 3 × 8 // 6 = 1 → 0 0 0; then 2 × 8 // 4 = 2 → 1 1 2 2; again 2 → 3 (cut at 8).
        (3, 8, (0, 0, 0, 1, 1, 2, 2, 3)),
        # One phase per halving of 2: 2 × 5 // 2 = 2 visits → 0 0 1 1; then 2 2 (cut at 5).
        (2, 5, (0, 0, 1, 1, 2)),
        # Budget smaller than the considered set: 4 × max(1, 2 // 8) = 1 visit, cut at 2 → only two children tried.
        (4, 2, (0, 0)),
        # A single child takes every simulation.
        (1, 3, (0, 1, 2)),
    ],
)
def test_considered_visit_schedules(k, n, expected):
    assert considered_visits(k, n) == expected


def test_gumbel_top_k_is_the_order_of_the_perturbed_logits():
    assert gumbel_top_k([0.5, 2.0, -1.0, 2.0], 3) == [1, 3, 0]  # tie 1/3 → lower position first
    assert gumbel_top_k([0.5, 2.0], 5) == [1, 0]


# -- completed Q, σ and π′ by hand -----------------------------------------------------------------------------


def hand_tree() -> Tree:
    """Root (own evaluation v = 0.5) with children priors 0.4, 0.3, 0.2, 0.1; child 0 visited once with value 0.2,
    child 2 three times with mean 0.8; children 1 and 3 unvisited."""
    tree = Tree(prompt="p")
    for j, prior in enumerate([0.4, 0.3, 0.2, 0.1]):
        tree.add_child(ROOT, make_step(f"s{j}", prior), prior, terminal=False)
    for node, visits, mean in [(1, 1, 0.2), (3, 3, 0.8)]:
        tree.nodes[node].visits, tree.nodes[node].value_sum = visits, mean * visits
    tree.nodes[ROOT].value, tree.nodes[ROOT].visits = 0.5, 5
    return tree


def test_completed_q_sigma_and_improved_policy_by_hand():
    tree = hand_tree()
    # mixed value: Σ_visited π q / Σ_visited π = (0.4·0.2 + 0.2·0.8) / 0.6 = 0.4; ΣN = 4 → (0.5 + 4·0.4) / 5 = 0.42
    assert completed_q(tree, ROOT) == pytest.approx([0.2, 0.42, 0.8, 0.42])
    # min-max rescale over [0.2, 0.8] → [0, 0.22/0.6, 1, 0.22/0.6]; σ factor (c_visit + max N) · c_scale = 53 · 0.1
    sig = sigma_q(tree, ROOT, 50.0, 0.1)
    assert sig == pytest.approx([0.0, 5.3 * 0.22 / 0.6, 5.3, 5.3 * 0.22 / 0.6])
    logits = [math.log(p) + s for p, s in zip([0.4, 0.3, 0.2, 0.1], sig)]
    expected = [math.exp(x) / sum(math.exp(y) for y in logits) for x in logits]
    assert improved_policy(tree, ROOT, 50.0, 0.1) == pytest.approx(expected)
    assert sum(improved_policy(tree, ROOT)) == pytest.approx(1.0)
    # c_scale = 0: σ vanishes and π′ is the prior
    assert improved_policy(tree, ROOT, 50.0, 0.0) == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_unvisited_children_complete_with_the_raw_value_and_pi_prime_is_the_prior():
    tree = hand_tree()
    for c in (1, 3):
        tree.nodes[c].visits, tree.nodes[c].value_sum = 0, 0.0
    assert completed_q(tree, ROOT) == [0.5] * 4
    assert sigma_q(tree, ROOT, 50.0, 0.1) == [0.0] * 4
    assert improved_policy(tree, ROOT) == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_interior_rule_matches_visits_to_pi_prime_and_counts_virtual_loss():
    """Equal Q (no real visits: every completed Q is the node's value) → π′ = prior (0.6, 0.4); the rule
    argmax π′ − N/(1 + ΣN) with N growing by virtual loss picks, by hand:
    N=[0,0]: .6 vs .4 → a; [1,0]: .1 vs .4 → b; [1,1]: .267 vs .067 → a; [2,1]: .1 vs .15 → b; [2,2]: .2 vs 0 → a;
    [3,2]: .1 vs .067 → a; [4,2]: .029 vs .114 → b; [4,3]: .1 vs .025 → a; [5,3]: .044 vs .067 → b; [5,4] → a."""
    tree = Tree(prompt="p")
    tree.nodes[ROOT].value = 0.5
    a = tree.add_child(ROOT, make_step("a", 0.6), 0.6, terminal=False)
    b = tree.add_child(ROOT, make_step("b", 0.4), 0.4, terminal=False)
    picks = []
    for _ in range(10):
        child = interior_select(tree, ROOT, MCTSConfig(), None)
        picks.append("a" if child == a else "b")
        tree.nodes[child].virtual_loss += 1
    assert "".join(picks) == "ababaababa"
    assert (tree.nodes[a].virtual_loss, tree.nodes[b].virtual_loss) == (6, 4)


# -- Sequential Halving on an exact bandit -------------------------------------------------------------------------

REWARDS = [0.2, 0.8, 0.5, 0.6]


def test_sequential_halving_visits_per_phase_uniform_priors():
    """No noise, uniform priors, 8 simulations, schedule 0 0 0 0 | 1 1 2 2.
    Phase 1: unvisited arms share the mixed value, so ties → arm order 0 1 2 3 (visits 1 1 1 1).
    Phase 2: the best two by σ(q̂) are arm1 (0.8) and arm3 (0.6), alternately → visits [1, 3, 1, 3]."""
    order, result = run_bandit(REWARDS, [1, 1, 1, 1], 8, gumbel_scale=0.0)
    assert order == [0, 1, 2, 3, 1, 3, 1, 3]
    assert arm_visits(result) == [1, 3, 1, 3]
    assert root_action(result.tree) == result.tree.nodes[ROOT].children[1]
    assert result.tree.nodes[ROOT].extra["gumbel"]["action"] == 2  # node index of arm1
    assert result.method == "gumbel/visits" and result.num_simulations == 8


@pytest.mark.parametrize(
    "c_visit, c_scale, expected_order, expected_visits, action",
    [
        # σ dominates (factor ≈ 5): phase 1a by logits (priors .4 > .3 > .2 > .1): arms 3 2 1 0; phase 1b by
        # log p + 5.1·q̂ (q̂ = 0, 1, .5, .67): arm1 3.49, arm3 2.48, arm2 1.35, arm0 -2.30; phase 2 keeps arm1, arm3.
        (50.0, 0.1, [3, 2, 1, 0, 1, 3, 2, 0] + [1, 3] * 4, [2, 6, 2, 6], 1),
        # σ tiny (factor N · 0.01): the logits decide every phase: arms 3 2 1 0 twice, then arm3, arm2 four times.
        (0.0, 0.01, [3, 2, 1, 0] * 2 + [3, 2] * 4, [2, 2, 6, 6], 3),
    ],
)
def test_sequential_halving_16_simulations_logits_against_q(
    c_visit, c_scale, expected_order, expected_visits, action
):
    order, result = run_bandit(
        REWARDS, [0.1, 0.2, 0.3, 0.4], 16, gumbel_scale=0.0, c_visit=c_visit, c_scale=c_scale
    )
    assert order == expected_order
    assert arm_visits(result) == expected_visits
    assert root_action(result.tree) == result.tree.nodes[ROOT].children[action]


def test_virtual_loss_waves_follow_the_same_schedule():
    """in_flight = 4: the first wave takes each arm once (virtual loss counts as a visit in the schedule); the
    later waves stop early at a claimed leaf, but the final visit counts equal the one-at-a-time search's."""
    _, one = run_bandit(REWARDS, [0.1, 0.2, 0.3, 0.4], 16, gumbel_scale=0.0)
    waves, four = run_bandit(REWARDS, [0.1, 0.2, 0.3, 0.4], 16, gumbel_scale=0.0, in_flight=4)
    assert sorted(waves[:4]) == [0, 1, 2, 3]
    assert arm_visits(four) == arm_visits(one) == [2, 6, 2, 6]
    assert all(n.virtual_loss == 0 for n in four.tree.nodes)


def test_policy_improvement_with_exact_q():
    """Exact Q (DeepBandit): per seed, the Gumbel action's Q is >= the Q of the Gumbel-max sample from the prior
    (argmax g + logits, whose expectation is Σ π q); over 100 seeds the mean beats Σ π q = 0.4."""
    priors = [0.5, 0.125, 0.25, 0.125]
    prior_mean = sum(p * r for p, r in zip(priors, REWARDS))
    assert prior_mean == pytest.approx(0.4)
    for sims in (2, 3, 4, 8):
        chosen = []
        for seed in range(100):
            _, result = run_bandit(REWARDS, priors, sims, seed=seed)
            tree = result.tree
            info = tree.nodes[ROOT].extra["gumbel"]
            children = tree.nodes[ROOT].children
            sample = children[max(range(4), key=lambda i: info["noise"][i] + math.log(priors[i]))]
            action = root_action(tree)
            assert tree.q(action) == pytest.approx(REWARDS[children.index(action)])  # Q is exact
            assert tree.q(action) >= tree.q(sample)
            chosen.append(tree.q(action))
        assert np.mean(chosen) >= prior_mean
        assert np.mean(chosen) > prior_mean + 0.1
    # without noise and with every arm visited, the action is the best arm although its prior is lowest
    _, result = run_bandit(REWARDS, priors, 4, gumbel_scale=0.0)
    assert root_action(result.tree) == result.tree.nodes[ROOT].children[1]


# -- determinism, batching, resume -----------------------------------------------------------------------------

CONFIG = MCTSConfig(num_simulations=12, num_children=3, in_flight=2, num_rollouts=2, max_depth=5)


def test_same_seed_same_tree_bytes_and_seed_matters():
    world = RandomTreeWorld(seed=3)
    prompts = [Trajectory(f"prompt {i}", key=i) for i in range(3)]

    def trees(seed):
        rs = gumbel_search(prompts, world, world.outcome_fn, config=CONFIG, rng=np.random.default_rng(seed))
        return [r.tree.to_json() for r in rs]

    a = trees(5)
    assert a == trees(5)
    assert a != trees(6)
    assert all(Tree.from_json(t).to_json() == t for t in a)


def test_batching_invariance():
    world = RandomTreeWorld(seed=3)
    prompts = [Trajectory(f"prompt {i}", key=10 * i) for i in range(5)]
    together = gumbel_search(prompts, world, world.outcome_fn, config=CONFIG, rng=np.random.default_rng(42))
    reversed_ = gumbel_search(
        prompts[::-1], world, world.outcome_fn, config=CONFIG, rng=np.random.default_rng(42)
    )
    for i, p in enumerate(prompts):
        [alone] = gumbel_search([p], world, world.outcome_fn, config=CONFIG, rng=np.random.default_rng(42))
        assert alone.tree.to_json() == together[i].tree.to_json() == reversed_[4 - i].tree.to_json()
        assert alone.budget.generated_tokens == together[i].budget.generated_tokens
        assert alone.answer == together[i].answer


def test_resume_matches_uninterrupted_run(tmp_path):
    world = RandomTreeWorld(seed=11)
    prompts = [Trajectory(f"prompt {i}", key=100 + i) for i in range(5)]

    def resume(store, ps, **kwargs):
        rng = np.random.default_rng(7)
        return search_resumable(
            store, ps, gumbel_search, world, world.outcome_fn, config=CONFIG, rng=rng, **kwargs
        )

    reference = TreeStore(tmp_path / "ref.jsonl")
    resume(reference, prompts)
    store = TreeStore(tmp_path / "resumed.jsonl")
    resume(store, prompts[:2])  # "killed" after two prompts
    rest = resume(store, prompts, chunk_size=2)
    assert [r.tree.key for r in rest] == [102, 103, 104]
    assert [t.to_json() for t in store.load()] == [t.to_json() for t in reference.load()]


def run_one(world, cfg):
    [r] = gumbel_search([Trajectory("p")], world, world.outcome_fn, config=cfg, rng=np.random.default_rng(0))
    return r


def test_budget_accounting_and_token_budget_stop():
    r = run_one(
        RandomTreeWorld(seed=2, eos_prob=0.1), MCTSConfig(num_simulations=500, token_budget=60, max_depth=8)
    )
    assert r.stop_reason == "token_budget"
    assert r.budget.generated_tokens >= 60 and r.num_simulations < 500
    assert r.tree.nodes[ROOT].visits == r.num_simulations + 1
    assert r.budget.backend["generated_tokens"] == r.budget.generated_tokens


def test_dirichlet_settings_are_ignored_and_config_is_validated():
    world, cfg = RandomTreeWorld(seed=4), MCTSConfig(num_simulations=6, num_children=3, max_depth=4)
    plain = run_one(world, cfg)
    noisy = run_one(world, cfg.replace(dirichlet_fraction=0.5, c_puct=9.0))
    assert plain.tree.to_json() == noisy.tree.to_json() and noisy.tree.root_priors is None
    for name, bad in [
        ("c_scale", -0.1),
        ("c_visit", float("nan")),
        ("gumbel_scale", float("inf")),
        ("c_scale", True),
    ]:
        with pytest.raises(ValueError, match=name):
            MCTSConfig(**{name: bad})


# -- π′ targets -------------------------------------------------------------------------------------------------


def test_improved_policy_records_by_hand():
    tree = hand_tree()
    pi = improved_policy(tree, ROOT, 50.0, 0.1)
    targets = improved_policy_targets(tree)
    assert [c for c, _, _ in targets[ROOT]] == [1, 2, 3, 4]
    assert [p for _, p, _ in targets[ROOT]] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert [t for _, _, t in targets[ROOT]] == pytest.approx(pi)
    adv = improved_policy_advantages(tree)
    assert adv == pytest.approx({1: pi[0] - 0.4, 2: pi[1] - 0.3, 3: pi[2] - 0.2, 4: pi[3] - 0.1})
    assert sum(adv.values()) == pytest.approx(0.0)
    assert adv[3] > 0 > adv[1]  # the 0.8 child gains mass, the 0.2 child loses it
    records = improved_policy_records(tree, scale=2.0)
    assert [r["node"] for r in records] == [1, 2, 3, 4] and records[0]["method"] == "improved_policy"
    r = records[2]
    assert r["completion_ids"] == [ord("s"), ord("2")] and r["loss_mask"] == [1, 1] and r["prefix_len"] == 0
    assert r["advantages"] == pytest.approx([2 * adv[3]] * 2)
    assert r["old_logprobs"] == [math.log(0.2)] * 2
    assert improved_policy_records(tree.to_dict()) == improved_policy_records(tree)
    # an unvisited node teaches nothing
    for c in (1, 3):
        tree.nodes[c].visits, tree.nodes[c].value_sum = 0, 0.0
    assert improved_policy_records(tree) == [] and improved_policy_targets(tree) == {}


def test_improved_policy_records_from_a_search_tree():
    """Records of a searched tree: context-only prefixes, one trained step each, advantages summing to 0 per node,
    c_visit/c_scale read from the tree's Gumbel record."""
    world = RandomTreeWorld(seed=5)
    tree = run_one(world, MCTSConfig(num_simulations=16, num_children=3, max_depth=4, c_scale=0.5)).tree
    records = improved_policy_records(tree)
    assert records
    assert improved_policy_records(tree, c_scale=0.5) == records != improved_policy_records(tree, c_scale=0.1)
    by_parent: dict[int, float] = {}
    for rec in records:
        node = tree.nodes[rec["node"]]
        n = len(node.step.token_ids)
        assert (
            len(rec["completion_ids"])
            == len(rec["advantages"])
            == len(rec["old_logprobs"])
            == len(rec["loss_mask"])
        )
        assert rec["loss_mask"] == [0] * rec["prefix_len"] + [1] * n
        assert rec["completion_ids"][rec["prefix_len"] :] == list(node.step.token_ids)
        by_parent[node.parent] = by_parent.get(node.parent, 0.0) + rec["advantages"][-1]
    assert all(abs(s) < 1e-9 for s in by_parent.values())


# -- CLI: eval and ablate accept gumbel ----------------------------------------------------------------------------


def test_ablate_grid_fields_for_gumbel():
    from thinktree.trainer import ablate
    from thinktree.trainer.config import ConfigError, SearchConfig

    cells = ablate.expand_grid(
        [{"method": "gumbel", "budget": [2, 4], "c_scale": [0.1, 1.0]}], SearchConfig()
    )
    assert [(c.search.num_simulations, c.search.c_scale, c.search.method) for c in cells] == [
        (2, 0.1, "gumbel"),
        (2, 1.0, "gumbel"),
        (4, 0.1, "gumbel"),
        (4, 1.0, "gumbel"),
    ]
    assert cells[0].budget == 2 and cells[0].label() == "gumbel (c_scale=0.1)"
    with pytest.raises(ConfigError, match="unknown field 'c_puct' for method 'gumbel'"):
        ablate.expand_grid([{"method": "gumbel", "c_puct": 1.0}], SearchConfig())
    with pytest.raises(ConfigError, match="unknown field 'c_visit' for method 'mcts'"):
        ablate.expand_grid([{"method": "mcts", "c_visit": 1.0}], SearchConfig())
    assert ablate.expand_grid([{"method": "gumbel", "evaluation": "value"}], SearchConfig())[0].needs_prm()


def test_eval_and_ablate_accept_gumbel_on_a_tiny_model(tmp_path):
    from thinktree.trainer.cli import main

    out = tmp_path / "ev.json"
    args = ["eval", *TINY, f"output.dir={tmp_path}/ev", "search.num_simulations=3", "--out", str(out)]
    assert main(args + ["--methods", "gumbel"]) == 0
    record = json.loads(out.read_text())
    m = record["methods"]["gumbel"]
    assert (
        m["num_prompts"] == 3 and m["generated_tokens"] > 0 and 0.0 <= m["accuracy"] <= m["pass_at_k"] <= 1.0
    )
    cells = "ablate.cells=[{method: gumbel, budget: [2, 4]}, {method: mcts, budget: 2}]"
    assert main(["ablate", *TINY, f"output.dir={tmp_path}/ab", cells]) == 0
    lines = (tmp_path / "ab" / "ablate" / "cells.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["method"] for r in records] == ["gumbel", "gumbel", "mcts"]
    assert all(r["metrics"]["generated_tokens"] > 0 for r in records)
