"""Tree → signal compilers on hand-built trees whose answers are worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from thinktree.rewards.labels import mc_labels
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import StepRecord, Trajectory
from thinktree.trainer.signals import (
    ADVANTAGES,
    generated_tokens,
    iid_group_advantages,
    pair_weight,
    sft_traces,
    signal_counts,
    step_pairs,
    step_values,
    tree_advantages,
)
from thinktree.trainer.signals.advantages import (
    grpo_leaf_advantages,
    treerl_step_advantages,
    treerpo_step_advantages,
)

# -- building trees by hand ----------------------------------------------------------------------------------------


def new_tree(prompt: str = "Q: ", key: int = 0) -> Tree:
    return Tree.from_prompt(Trajectory(prompt, key=key))


def add(
    tree: Tree,
    parent: int,
    text: str,
    ids: tuple[int, ...] = (),
    *,
    terminal: bool = False,
    reward: float | None = None,
    q: float | None = None,
    visits: int = 1,
    rollouts: tuple[float, ...] = (),
) -> int:
    """Add a child; ``q`` sets visits/value_sum so that ``tree.q(child) == q``; logprobs are ``-id/10``."""
    step = StepRecord(text, token_ids=ids, logprobs=tuple(-t / 10 for t in ids), eos=terminal)
    i = tree.add_child(parent, step, prior=1.0, terminal=terminal)
    node = tree.nodes[i]
    node.reward = reward
    node.rollout_rewards = list(rollouts)
    if q is not None:
        node.visits = visits
        node.value_sum = q * visits
    return i


def tree_t1() -> tuple[Tree, dict[str, int]]:
    """The reference tree for advantages (token ids in brackets, outcomes after '→')::

        root
        ├── a [1,2]
        │   ├── c [4,5]  terminal → 1
        │   └── d [6]    terminal → 0
        └── b [3]
            ├── e [7,8]  terminal → 0
            └── f [9]    open leaf, rollouts (1, 0)

    Evidence L(n) and V(n) = mean score:  c {1} 1 · d {0} 0 · a {1,0} 1/2 · e {0} 0 · f {1,0} 1/2 ·
    b {0,1,0} 1/3 · root {1,0,0,1,0} 2/5.
    """
    t = new_tree()
    n = {}
    n["a"] = add(t, ROOT, "A", (1, 2))
    n["b"] = add(t, ROOT, "B", (3,))
    n["c"] = add(t, n["a"], "C", (4, 5), terminal=True, reward=1.0)
    n["d"] = add(t, n["a"], "D", (6,), terminal=True, reward=0.0)
    n["e"] = add(t, n["b"], "E", (7, 8), terminal=True, reward=None)  # ungraded → 0
    n["f"] = add(t, n["b"], "F", (9,), rollouts=(1.0, 0.0))
    return t, n


# -- values and advantages -----------------------------------------------------------------------------------------


def test_step_values_t1():
    t, n = tree_t1()
    v = step_values(t)
    assert v[ROOT] == pytest.approx((2 / 5, 5))
    assert v[n["a"]] == pytest.approx((1 / 2, 2))
    assert v[n["b"]] == pytest.approx((1 / 3, 3))
    assert v[n["c"]] == (1.0, 1) and v[n["d"]] == (0.0, 1) and v[n["e"]] == (0.0, 1)
    assert v[n["f"]] == pytest.approx((1 / 2, 2))


def test_step_values_match_math_shepherd_soft_labels():
    # One definition of "evidence below a step" across the two packages.
    t, _ = tree_t1()
    v = step_values(t)
    for node, (soft, _hard) in mc_labels(t.to_dict()).items():
        assert v[node][0] == pytest.approx(soft)


def test_treerl_t1():
    # A(n) = (V(n) − V(root)) + (V(n) − V(parent)), V(root) = 2/5:
    #   a: (1/2 − 2/5) + (1/2 − 2/5) = 1/5        b: 2·(1/3 − 2/5) = −2/15
    #   c: (1 − 2/5) + (1 − 1/2) = 11/10          d: (0 − 2/5) + (0 − 1/2) = −9/10
    #   e: (0 − 2/5) + (0 − 1/3) = −11/15         f: (1/2 − 2/5) + (1/2 − 1/3) = 4/15
    t, n = tree_t1()
    adv = treerl_step_advantages(t)
    expect = {"a": 1 / 5, "b": -2 / 15, "c": 11 / 10, "d": -9 / 10, "e": -11 / 15, "f": 4 / 15}
    assert adv == pytest.approx({n[k]: v for k, v in expect.items()})
    # 1/sqrt(|L(n)|) reweighting (the paper's): |L| = a 2, b 3, c 1, d 1, e 1, f 2.
    sizes = {"a": 2, "b": 3, "c": 1, "d": 1, "e": 1, "f": 2}
    adv = treerl_step_advantages(t, sqrt_leaf_norm=True)
    assert adv == pytest.approx({n[k]: v / math.sqrt(sizes[k]) for k, v in expect.items()})


def test_treerl_records_path_and_dedupe():
    t, n = tree_t1()
    recs = tree_advantages(t, "treerl")
    # One record per terminal leaf, in leaf-index order: c, d, e; each token carries its own step's advantage.
    assert [r["node"] for r in recs] == [n["c"], n["d"], n["e"]]
    rc = recs[0]
    assert rc["completion_ids"] == [1, 2, 4, 5]
    assert rc["advantages"] == pytest.approx([1 / 5, 1 / 5, 11 / 10, 11 / 10])
    assert rc["old_logprobs"] == pytest.approx([-0.1, -0.2, -0.4, -0.5])
    assert rc["loss_mask"] == [1, 1, 1, 1] and rc["prefix_len"] == 0
    assert rc["prompt"] == "Q: " and rc["key"] == 0 and rc["method"] == "treerl"
    re_ = recs[2]
    assert re_["completion_ids"] == [3, 7, 8]
    assert re_["advantages"] == pytest.approx([-2 / 15, -11 / 15, -11 / 15])

    # Dedupe: one record per scored step (a, b, c, d, e, f — f has only rollouts), prefix masked out.
    recs = tree_advantages(t, "treerl", dedupe_prefixes=True)
    assert [r["node"] for r in recs] == [n[k] for k in "abcdef"]
    rf = recs[-1]
    assert rf["completion_ids"] == [3, 9] and rf["loss_mask"] == [0, 1] and rf["prefix_len"] == 1
    assert rf["advantages"] == pytest.approx([0.0, 4 / 15])
    rc = recs[2]
    assert rc["completion_ids"] == [1, 2, 4, 5] and rc["loss_mask"] == [0, 0, 1, 1]
    # Every generated token of the tree is trained exactly once.
    assert signal_counts(recs)["advantage_tokens"] == generated_tokens(t) == 9


def test_treerpo_t1():
    # A(n) = V(n) − mean of its sibling group:
    #   {a 1/2, b 1/3}: mean 5/12 → a +1/12, b −1/12
    #   {c 1, d 0}: mean 1/2 → ±1/2          {e 0, f 1/2}: mean 1/4 → e −1/4, f +1/4
    t, n = tree_t1()
    adv = treerpo_step_advantages(t)
    expect = {"a": 1 / 12, "b": -1 / 12, "c": 1 / 2, "d": -1 / 2, "e": -1 / 4, "f": 1 / 4}
    assert adv == pytest.approx({n[k]: v for k, v in expect.items()})
    # normalize: divide by the group's sample std (+1e-4). {c, d}: std = sqrt(((1/2)² + (1/2)²)/1) = 1/√2.
    adv = treerpo_step_advantages(t, normalize=True)
    assert adv[n["c"]] == pytest.approx(0.5 / (1 / math.sqrt(2) + 1e-4))
    recs = tree_advantages(t, "treerpo")
    assert recs[1]["completion_ids"] == [1, 2, 6]
    assert recs[1]["advantages"] == pytest.approx([1 / 12, 1 / 12, -1 / 2])


def test_treerpo_lone_child_gets_zero():
    t = new_tree()
    a = add(t, ROOT, "A", (1,))
    c = add(t, a, "C", (2,), terminal=True, reward=1.0)
    assert treerpo_step_advantages(t) == {a: 0.0, c: 0.0}


def test_grpo_t1():
    # Group = terminal leaves c (1), d (0), e (None → 0): mean 1/3,
    # sample std = sqrt(((2/3)² + 2·(1/3)²) / 2) = sqrt(1/3).
    t, n = tree_t1()
    s = math.sqrt(1 / 3) + 1e-4
    adv = grpo_leaf_advantages(t)
    assert adv == pytest.approx({n["c"]: (2 / 3) / s, n["d"]: (-1 / 3) / s, n["e"]: (-1 / 3) / s})
    recs = tree_advantages(t, "grpo")
    assert [r["node"] for r in recs] == [n["c"], n["d"], n["e"]]
    # The shared prefix a appears in both c's and d's records, with each leaf's advantage.
    assert recs[0]["advantages"] == pytest.approx([(2 / 3) / s] * 4)
    assert recs[1]["completion_ids"] == [1, 2, 6]
    assert recs[1]["advantages"] == pytest.approx([(-1 / 3) / s] * 3)
    # normalize=False: Dr. GRPO (no std).
    assert grpo_leaf_advantages(t, normalize=False)[n["c"]] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        tree_advantages(t, "grpo", dedupe_prefixes=True)


def test_threshold_none_uses_raw_outcomes():
    # Leaves 0.7 and 0.2. Thresholded: V = 1, 0; raw: V = 0.7, 0.2 → TreeRPO ±0.25.
    t = new_tree()
    x = add(t, ROOT, "X", (1,), terminal=True, reward=0.7)
    y = add(t, ROOT, "Y", (2,), terminal=True, reward=0.2)
    assert treerpo_step_advantages(t) == pytest.approx({x: 0.5, y: -0.5})
    assert treerpo_step_advantages(t, threshold=None) == pytest.approx({x: 0.25, y: -0.25})


def test_registry_and_degenerate_trees():
    assert set(ADVANTAGES) == {"treerl", "treerpo", "grpo"}
    with pytest.raises(KeyError, match="known"):
        tree_advantages(new_tree(), "ppo")
    # No terminal leaf and no rollout: nothing to train on.
    t = new_tree()
    add(t, ROOT, "A", (1,))
    for m in ADVANTAGES:
        assert tree_advantages(t, m) == []
    # All-correct tree: every advantage is 0 (records still emitted, counted as zero-advantage tokens).
    t = new_tree()
    a = add(t, ROOT, "A", (1,))
    add(t, a, "B", (2,), terminal=True, reward=1.0)
    add(t, a, "C", (3,), terminal=True, reward=1.0)
    for m in ADVANTAGES:
        recs = tree_advantages(t, m)
        c = signal_counts(recs)
        assert (
            c["advantage_records"] == 2 and c["advantage_tokens"] == 4 and c["nonzero_advantage_tokens"] == 0
        )


def test_tree_dict_and_json_inputs():
    t, _ = tree_t1()
    ref = tree_advantages(t, "treerl")
    assert tree_advantages(t.to_dict(), "treerl") == ref
    assert tree_advantages(t.to_json(), "treerl") == ref


def test_iid_group_advantages_matches_grpo_on_chains():
    # Best-of-3: three unbranched chains with outcomes 1, 0, 0 (same numbers as test_grpo_t1).
    t = new_tree(key=7)
    leaves = []
    for k, r in enumerate((1.0, 0.0, 0.0)):
        s = add(t, ROOT, f"S{k}", (10 + k,))
        leaves.append(add(t, s, f"E{k}", (20 + k,), terminal=True, reward=r))
    recs = iid_group_advantages(t)
    s = math.sqrt(1 / 3) + 1e-4
    assert [r["node"] for r in recs] == leaves
    assert recs[0]["completion_ids"] == [10, 20] and recs[0]["advantages"] == pytest.approx([(2 / 3) / s] * 2)
    assert [r["advantages"] for r in recs] == [r["advantages"] for r in tree_advantages(t, "grpo")]
    assert iid_group_advantages([t, t])[3]["node"] == leaves[0]
    # Equal generated tokens: 6 tokens generated, 6 trained.
    assert generated_tokens(t) == signal_counts(recs)["advantage_tokens"] == 6
    tb, _ = tree_t1()
    with pytest.raises(ValueError, match="branches"):
        iid_group_advantages(tb)


def test_random_trees_invariants():
    # Properties on random trees: TreeRPO groups sum to 0, GRPO leaves average to 0, path records are consistent.
    rng = np.random.default_rng(1)
    for key in range(30):
        t = new_tree(key=key)
        tok = 0
        for _ in range(int(rng.integers(1, 25))):
            open_ = t.open_leaves()
            parent = int(rng.choice(open_)) if open_ else ROOT
            tok += 1
            add(
                t,
                parent,
                f"s{tok}",
                (tok,) * int(rng.integers(0, 3)),
                terminal=bool(rng.random() < 0.4),
                reward=[None, 0.0, 1.0, 0.6][int(rng.integers(4))],
                rollouts=tuple(float(x) for x in rng.integers(0, 2, size=int(rng.integers(0, 3)))),
            )
        rpo = treerpo_step_advantages(t)
        for node in t.nodes:
            group = [c for c in node.children if c in rpo]
            assert abs(sum(rpo[c] for c in group)) < 1e-9
        g = grpo_leaf_advantages(t)
        assert abs(sum(g.values())) < 1e-9
        for m in ADVANTAGES:
            for r in tree_advantages(t, m):
                assert (
                    len(r["completion_ids"])
                    == len(r["advantages"])
                    == len(r["old_logprobs"])
                    == len(r["loss_mask"])
                )
                assert t.nodes[r["node"]].terminal
        dedup = tree_advantages(t, "treerl", dedupe_prefixes=True)
        assert len(dedup) == len(step_values(t)) - (ROOT in step_values(t))


# -- SFT traces ----------------------------------------------------------------------------------------------------


def tree_t2() -> tuple[Tree, dict[str, int]]:
    """Q after each node::

    root
    ├── a "x=1;" Q .6
    │   ├── c " ans 2" terminal → 1, Q 1.0      path mean Q (.6 + 1.0)/2 = .8
    │   └── d " ans 3" terminal → 0, Q 0.0      wrong
    └── b "x=2;" Q .4
        └── e " ans 2" terminal → 1, Q .8       path mean Q (.4 + .8)/2 = .6
    """
    t = new_tree("P:", key=3)
    n = {}
    n["a"] = add(t, ROOT, "x=1;", q=0.6, visits=5)
    n["b"] = add(t, ROOT, "x=2;", q=0.4, visits=5)
    n["c"] = add(t, n["a"], " ans 2", terminal=True, reward=1.0, q=1.0, visits=2)
    n["d"] = add(t, n["a"], " ans 3", terminal=True, reward=0.0, q=0.0, visits=2)
    n["e"] = add(t, n["b"], " ans 2", terminal=True, reward=1.0, q=0.8, visits=4)
    return t, n


def test_sft_traces_ranking():
    t, n = tree_t2()
    (r,) = sft_traces([t], k=1)
    assert r == {
        "prompt": "P:",
        "completion": "x=1; ans 2",
        "key": 3,
        "node": n["c"],
        "q": pytest.approx(0.8),
        "reward": 1.0,
    }
    rs = sft_traces([t], k=5)
    assert [x["node"] for x in rs] == [n["c"], n["e"]]  # d is wrong
    assert rs[1]["q"] == pytest.approx(0.6) and rs[1]["completion"] == "x=2; ans 2"
    # Threshold above 1: no correct leaf, no trace.
    assert sft_traces([t], threshold=1.5) == []


def test_sft_traces_ties_and_dedupe():
    # Two paths with mean Q .5 each: leaf rewards .7 and 1.0 → the 1.0 leaf first (then lower index).
    t = new_tree()
    a = add(t, ROOT, "a", q=0.5)
    x = add(t, a, "x", terminal=True, reward=0.7, q=0.5)
    y = add(t, a, "y", terminal=True, reward=1.0, q=0.5)
    assert [r["node"] for r in sft_traces([t], k=2)] == [y, x]
    # Equal Q and reward → lower index first.
    z = add(t, a, "z", terminal=True, reward=1.0, q=0.5)
    assert [r["node"] for r in sft_traces([t], k=3)] == [y, z, x]
    # Identical completion text along different steps ("ab"+"c" vs "a"+"bc"): kept once.
    t = new_tree()
    p = add(t, ROOT, "ab", q=0.9)
    add(t, p, "c", terminal=True, reward=1.0, q=0.9)
    p = add(t, ROOT, "a", q=0.8)
    add(t, p, "bc", terminal=True, reward=1.0, q=0.8)
    p = add(t, ROOT, "other", q=0.1)
    o = add(t, p, "!", terminal=True, reward=1.0, q=0.1)
    rs = sft_traces([t], k=2)
    assert [r["completion"] for r in rs] == ["abc", "other!"] and rs[1]["node"] == o


# -- step pairs ----------------------------------------------------------------------------------------------------


def tree_t3() -> tuple[Tree, dict[str, int]]:
    """Q (visits)::

    root
    ├── a "A" .8 (5)
    │   ├── a1 "A1" 1.0 (2)
    │   └── a2 "A2" .95 (2)     gap .05 < .1 → no pair at a
    ├── b "B" .5 (2)
    └── c "C" .2 (3)
    """
    t = new_tree("P|")
    n = {}
    n["a"] = add(t, ROOT, "A", q=0.8, visits=5)
    n["b"] = add(t, ROOT, "B", q=0.5, visits=2)
    n["c"] = add(t, ROOT, "C", q=0.2, visits=3)
    n["a1"] = add(t, n["a"], "A1", q=1.0, visits=2)
    n["a2"] = add(t, n["a"], "A2", q=0.95, visits=2)
    return t, n


def test_step_pairs_best_worst():
    # Root: chosen a (.8), rejected c (.2); gap .6; min visits min(5, 3) = 3 → weight .6·(1 − 1/√4) = .3.
    t, n = tree_t3()
    (p,) = step_pairs([t])
    assert p["prompt"] == "P|" and p["chosen"] == "A" and p["rejected"] == "C"
    assert p["node"] == ROOT and p["chosen_node"] == n["a"] and p["rejected_node"] == n["c"]
    assert p["q_chosen"] == pytest.approx(0.8) and p["q_rejected"] == pytest.approx(0.2)
    assert p["weight"] == pytest.approx(0.3)
    # min_margin 0.04: the pair at a is kept too (prompt = prompt + "A"); gap .05, visits 2 → .05·(1 − 1/√3).
    ps = step_pairs([t], min_margin=0.04)
    assert [x["node"] for x in ps] == [ROOT, n["a"]]
    assert ps[1]["prompt"] == "P|A" and (ps[1]["chosen"], ps[1]["rejected"]) == ("A1", "A2")
    assert ps[1]["weight"] == pytest.approx(0.05 * (1 - 1 / math.sqrt(3)))
    # min_visits 3: b (2 visits) leaves the comparison, still a vs c; min_visits 4: only a is visited → nothing.
    assert [x["rejected"] for x in step_pairs([t], min_visits=3)] == ["C"]
    assert step_pairs([t], min_visits=4) == []


def test_step_pairs_random():
    t, n = tree_t3()
    seen = {
        p["rejected"] for s in range(20) for p in step_pairs([t], mode="random", rng=np.random.default_rng(s))
    }
    assert seen == {"B", "C"}  # both have gap ≥ .1 (.3 and .6)
    # With min_margin .4 only c qualifies.
    ps = step_pairs([t], mode="random", min_margin=0.4, rng=np.random.default_rng(0))
    assert [p["rejected"] for p in ps] == ["C"]
    # Reproducible with the default rng.
    assert step_pairs([t], mode="random") == step_pairs([t], mode="random")


def test_pair_weight_range():
    assert pair_weight(0.6, 5, 3) == pytest.approx(0.3)
    assert 0 < pair_weight(1.0, 1, 1) < pair_weight(1.0, 100, 100) < 1
    assert pair_weight(2.0, 3, 3) == pytest.approx(0.5)  # gap clipped to 1


def test_signal_counts_mixed():
    t, _ = tree_t2()
    tt, _ = tree_t3()
    recs = sft_traces([t], k=2) + step_pairs([tt]) + tree_advantages(tree_t1()[0], "treerl")
    c = signal_counts(recs)
    assert c["traces"] == 2 and c["pairs"] == 1 and c["advantage_records"] == 3
    assert c["advantage_tokens"] == 4 + 3 + 3 and c["trees"] == 2  # keys 3 and 0
