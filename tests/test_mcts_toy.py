"""MCTS on toy worlds with known answers (mctx-style): exact bandit visit counts, the arithmetic world, batching."""

import math

import numpy as np
import pytest

from thinktree.search import MCTSConfig, Trajectory, greedy, search
from thinktree.search.mcts import backup
from thinktree.search.selection import SELECT_FNS, choose_answer
from thinktree.search.toy import ArithmeticWorld, BanditWorld, RandomTreeWorld, make_step
from thinktree.search.tree import ROOT, Tree

# -- bandit: exact visit counts ------------------------------------------------------------------------------


def run_bandit(rewards, priors, root_value, sims, **config):
    world = BanditWorld(rewards, priors, root_value=root_value)
    cfg = MCTSConfig(num_simulations=sims, num_children=len(rewards), evaluation="value", **config)
    [result] = search(
        [Trajectory("bandit")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
    )
    tree = result.tree
    return [tree.nodes[c].visits for c in tree.nodes[ROOT].children], result


def reference_bandit(
    rewards, priors, v0, sims, select="puct", c_puct=1.25, pb_c_base=None, pb_c_init=1.25, fill_q="parent"
):
    """Closed-form replay of MCTS on a flat bandit: Q(arm i) = r_i, Q(root) = (v0 + Σ n_i r_i) / (1 + Σ n_i),
    min-max bounds over the visited nodes. The world is solved (search stops) once every arm has 2 visits."""
    k, n = len(rewards), [0] * len(rewards)
    p = [x / sum(priors) for x in priors]
    for _ in range(sims):
        if all(x >= 2 for x in n):
            break
        big_n = 1 + sum(n)
        root_q = (v0 + sum(ni * ri for ni, ri in zip(n, rewards))) / big_n
        qs = [root_q] + [r for r, ni in zip(rewards, n) if ni]
        lo, hi = min(qs), max(qs)

        def norm(q, lo=lo, hi=hi):
            return (q - lo) / (hi - lo) if hi > lo else q

        if select == "uct":
            scores = [
                math.inf if n[i] == 0 else norm(rewards[i]) + c_puct * math.sqrt(math.log(big_n) / n[i])
                for i in range(k)
            ]
        else:
            c = c_puct if pb_c_base is None else pb_c_init + math.log((1 + big_n + pb_c_base) / pb_c_base)
            fill = 0.0 if fill_q == "zero" else norm(root_q)
            scores = [
                (norm(rewards[i]) if n[i] else fill) + c * p[i] * math.sqrt(big_n) / (1 + n[i])
                for i in range(k)
            ]
        n[scores.index(max(scores))] += 1
    return n


def test_puct_equal_values_is_dhondt():
    """All values equal → Q terms tie, PUCT picks argmax p_i / (1 + n_i): D'Hondt apportionment of 8 seats for
    priors (1/2, 1/4, 1/4): a0, a0 (tie→lowest), a1, a2, a0, a0 (tie), a1, a2 → [4, 2, 2]."""
    visits, result = run_bandit([0.5] * 3, [0.5, 0.25, 0.25], 0.5, 8, c_puct=1.0)
    assert visits == [4, 2, 2]
    assert result.tree.nodes[ROOT].visits == 9


def test_puct_without_exploration_parent_fill():
    """c = 0, fill = parent Q. Sim 1: all unvisited tie → a0 (0.2). Then Q̂(a0) = 0 < fill = Q̂(root) = 1 → a1
    (0.8), normalised to 1; Q(root) < 0.8 forever, so a1 gets every later simulation; a2 is never tried."""
    visits, _ = run_bandit([0.2, 0.8, 0.5], [1, 1, 1], 0.5, 10, c_puct=0.0)
    assert visits == [1, 9, 0]


def test_puct_without_exploration_zero_fill_gets_stuck():
    """c = 0, fill = 0: a0 is tried first and its normalised Q (0) ties the unvisited fill (0) → lowest index."""
    visits, _ = run_bandit([0.2, 0.8, 0.5], [1, 1, 1], 0.5, 10, c_puct=0.0, fill_q="zero")
    assert visits == [10, 0, 0]


def test_uct_exact_counts():
    """UCT, c = 1: a0, a1, a2 once each (unvisited first), then Q̂ + sqrt(ln N / n) gives a1 ×2, a2, a1 ×4, a2,
    a1 (worked by hand: e.g. at N = 11, a2 scores 0.5 + sqrt(ln 11) = 1.595 > a1's 1 + sqrt(ln 11 / 7) = 1.585)."""
    visits, _ = run_bandit([0.2, 0.8, 0.5], [1, 1, 1], 0.5, 12, select="uct", c_puct=1.0)
    assert visits == [1, 8, 3]


@pytest.mark.parametrize(
    "config, expected",
    [
        (dict(c_puct=1.0), [2, 23, 4, 1]),
        (dict(pb_c_base=5.0, pb_c_init=0.5), [3, 6, 4, 2]),
        (dict(select="uct", c_puct=0.5), [1, 23, 2, 4]),
        (dict(c_puct=3.0, fill_q="zero"), None),
        (dict(select="uct", c_puct=2.0), None),
    ],
)
def test_bandit_matches_closed_form(config, expected):
    args = ([0.2, 0.8, 0.5, 0.6], [0.5, 0.125, 0.25, 0.125], 0.5, 30)
    visits, result = run_bandit(*args, **config)
    assert visits == reference_bandit(*args, **config)
    if expected is not None:
        assert visits == expected
    assert result.tree.nodes[ROOT].visits == result.num_simulations + 1 == sum(visits) + 1


def test_solved_tree_stops():
    visits, result = run_bandit([0.2, 0.8, 0.5], [1, 1, 1], 0.5, 1000, c_puct=5.0)
    assert result.stop_reason == "solved"
    assert result.num_simulations < 1000 and all(v >= 2 for v in visits)
    assert result.tree.nodes[ROOT].visits == result.num_simulations + 1


def test_virtual_loss_spreads_a_wave():
    """in_flight = 3 on the D'Hondt bandit: without virtual loss all three would pick a0; with it (value 0)
    the first wave visits each arm once."""
    world = BanditWorld([0.5] * 3, [0.5, 0.25, 0.25])
    cfg = MCTSConfig(num_simulations=3, num_children=3, evaluation="value", in_flight=3, c_puct=1.0)
    waves = []
    search(
        [Trajectory("b")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
        progress=lambda info: waves.append([info["trees"][0].nodes[c].visits for c in (1, 2, 3)]),
    )
    assert waves == [[1, 1, 1]]


def test_claimed_leaf_ends_wave_early():
    """A chain world (one digit): every selection in a wave reaches the same leaf, so each wave runs one sim."""
    world = ArithmeticWorld(digits=(1,), depth=6, target=6)
    cfg = MCTSConfig(num_simulations=4, num_children=1, evaluation="value", in_flight=4)
    sims = []
    search(
        [Trajectory("c")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
        progress=lambda info: sims.append(info["simulations"]),
    )
    assert sims == [1, 2, 3, 4]


# -- arithmetic world: the optimal path ---------------------------------------------------------------------


@pytest.mark.parametrize("evaluation", ["rollout", "value", "mixed"])
def test_mcts_finds_target_greedy_does_not(evaluation):
    world = ArithmeticWorld()  # digits 0..3, 3 steps, target 4; the prior prefers 3s
    prompts = [Trajectory(f"sum to 4 #{i}", key=i) for i in range(6)]
    cfg = MCTSConfig(num_simulations=40, num_children=4, evaluation=evaluation, answer_selection="q")
    results = search(
        prompts,
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(1),
        value_fn=world.value_fn,
        answer_fn=world.answer_fn,
    )
    assert [r.answer for r in results] == ["4"] * 6
    assert all(r.reward == 1.0 and r.tree.nodes[r.node].terminal for r in results)
    greedy_world = ArithmeticWorld(greedy=True)
    [g] = greedy(
        prompts[:1],
        greedy_world,
        greedy_world.outcome_fn,
        rng=np.random.default_rng(1),
        answer_fn=world.answer_fn,
    )
    assert (g.completion, g.answer, g.reward) == ("+3+3+3=9", "9", 0.0)


# -- batching, determinism, accounting ----------------------------------------------------------------------

BATCH_CONFIG = MCTSConfig(
    num_simulations=12, num_children=3, in_flight=2, num_rollouts=2, max_depth=5, dirichlet_fraction=0.25
)


def test_batching_invariance():
    world = RandomTreeWorld(seed=3)
    prompts = [Trajectory(f"prompt {i}", key=10 * i) for i in range(5)]
    together = search(prompts, world, world.outcome_fn, config=BATCH_CONFIG, rng=np.random.default_rng(42))
    reversed_ = search(
        prompts[::-1], world, world.outcome_fn, config=BATCH_CONFIG, rng=np.random.default_rng(42)
    )
    for i, p in enumerate(prompts):
        [alone] = search([p], world, world.outcome_fn, config=BATCH_CONFIG, rng=np.random.default_rng(42))
        assert alone.tree.to_json() == together[i].tree.to_json() == reversed_[4 - i].tree.to_json()
        assert alone.budget.generated_tokens == together[i].budget.generated_tokens


def test_one_propose_call_per_wave_for_all_trees():
    world = RandomTreeWorld(seed=1)
    prompts = [Trajectory(f"p{i}", key=i) for i in range(5)]
    waves = []
    cfg = MCTSConfig(num_simulations=6, num_children=2, evaluation="value", in_flight=2)
    results = search(
        prompts,
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
        progress=waves.append,
    )
    assert world.stats["calls"] <= len(waves) + 1  # + the roots' expansion
    assert results[0].budget.backend["calls"] == world.stats["calls"]
    assert all(r.budget.proposer_calls <= len(waves) + 1 for r in results)


def test_budget_counts_tokens_exactly():
    world = ArithmeticWorld()  # enumerates distinct digits: no merged duplicates
    cfg = MCTSConfig(num_simulations=10, num_children=4, num_rollouts=2)
    [r] = search([Trajectory("p")], world, world.outcome_fn, config=cfg, rng=np.random.default_rng(0))
    tree_tokens = sum(len(n.step.token_ids) for n in r.tree.nodes[1:])
    assert r.budget.rollout_tokens > 0
    assert r.budget.generated_tokens - r.budget.rollout_tokens == tree_tokens
    assert r.budget.backend["generated_tokens"] == r.budget.generated_tokens
    assert r.budget.wall_time_s > 0


def test_token_budget_stops_tree():
    world = RandomTreeWorld(seed=2, eos_prob=0.1)
    cfg = MCTSConfig(num_simulations=500, num_children=3, token_budget=60, max_depth=8)
    [r] = search([Trajectory("p")], world, world.outcome_fn, config=cfg, rng=np.random.default_rng(0))
    assert r.stop_reason == "token_budget"
    assert r.budget.generated_tokens >= 60 and r.num_simulations < 500
    assert r.tree.nodes[ROOT].visits == r.num_simulations + 1


def test_rollouts_recorded_and_mixed_value():
    world = BanditWorld([0.0, 1.0], [0.5, 0.5], root_value=0.2)
    cfg = MCTSConfig(num_simulations=1, num_children=2, evaluation="mixed", lambda_mix=0.25, num_rollouts=4)
    [r] = search(
        [Trajectory("p")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
    )
    root = r.tree.nodes[ROOT]
    assert len(root.rollout_rewards) == 4 and set(root.rollout_rewards) <= {0.0, 1.0}
    rollout_mean = sum(root.rollout_rewards) / 4
    first_eval = (
        root.value_sum - r.tree.nodes[root.children[0]].value_sum - r.tree.nodes[root.children[1]].value_sum
    )
    assert first_eval == pytest.approx(0.75 * 0.2 + 0.25 * rollout_mean)


def test_max_backup():
    world = BanditWorld([0.2, 0.9, 0.4])
    cfg = MCTSConfig(num_simulations=6, num_children=3, evaluation="value", backup="max")
    [r] = search(
        [Trajectory("p")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
    )
    assert r.tree.backup == "max"
    assert r.tree.q(ROOT) == 0.9
    assert r.tree.nodes[ROOT].value_sum / r.tree.nodes[ROOT].visits < 0.9


def test_dirichlet_noise_is_seeded():
    world = BanditWorld([0.5] * 4)
    cfg = MCTSConfig(num_simulations=4, num_children=4, evaluation="value", dirichlet_fraction=0.5)

    def root_priors(seed):
        [r] = search(
            [Trajectory("p")],
            world,
            world.outcome_fn,
            config=cfg,
            rng=np.random.default_rng(seed),
            value_fn=world.value_fn,
        )
        return r.tree.root_priors

    a = root_priors(0)
    assert a == root_priors(0) and a != root_priors(1)
    assert sum(a) == pytest.approx(1.0) and a != [0.25] * 4
    [r] = search(
        [Trajectory("p")],
        world,
        world.outcome_fn,
        config=cfg.replace(dirichlet_fraction=0.0),
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
    )
    assert r.tree.root_priors is None


def test_injected_select_fn():
    world = BanditWorld([0.5] * 3)
    calls = []

    def last_child(tree, node, config, bounds):
        calls.append(node)
        return tree.nodes[node].children[-1]

    cfg = MCTSConfig(num_simulations=5, num_children=3, evaluation="value")
    [r] = search(
        [Trajectory("p")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        value_fn=world.value_fn,
        select_fn=last_child,
    )
    assert calls and r.tree.nodes[3].visits == 5  # arm2 and its "=2" child took every simulation
    assert set(SELECT_FNS) == {"puct", "uct"}


# -- answer selection ---------------------------------------------------------------------------------------


def voting_tree() -> Tree:
    """Six finished answers: '=1' twice (values 0.1, 0.2), '=2' three times (0.0, 0.0, 0.1), '=3' once (0.9)."""
    tree = Tree(prompt="p")
    for text, value in [("=1", 0.1), ("=2", 0.0), ("=1 ", 0.2), ("=2 ", 0.0), ("=3", 0.9), ("=2  ", 0.1)]:
        leaf = tree.add_child(ROOT, make_step(text, eos=True), 1 / 6, terminal=True)
        tree.nodes[leaf].reward = value
        backup(tree, [ROOT, leaf], value)
    return tree


def answer(completion):
    return completion.split("=")[1].strip()


def test_choose_answer_methods():
    tree = voting_tree()
    assert choose_answer(tree, "majority", answer) == (6, "2")  # the '2' leaf with the best Q
    assert choose_answer(tree, "weighted_vote", answer)[1] == "3"  # 0.9 > 0.3 > 0.1
    assert choose_answer(tree, "q", answer) == (5, "3")
    assert choose_answer(tree, "visits", answer) == (5, "3")  # all 1 visit → best Q
    with pytest.raises(ValueError, match="needs an answer_fn"):
        choose_answer(tree, "majority", None)


def test_majority_search_answer():
    world = RandomTreeWorld(seed=5)
    cfg = MCTSConfig(num_simulations=20, num_children=3, answer_selection="majority", max_depth=4)
    [r] = search(
        [Trajectory("p")],
        world,
        world.outcome_fn,
        config=cfg,
        rng=np.random.default_rng(0),
        answer_fn=world.answer_fn,
    )
    answers = [world.answer_fn(r.tree.trajectory(i).completion) for i in r.tree.terminal_leaves()]
    counts = {a: answers.count(a) for a in answers if a is not None}
    assert counts[r.answer] == max(counts.values())
    assert r.method == "mcts/majority"
