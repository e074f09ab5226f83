"""PRM labels from dict-form trees, checked against worked examples computed by hand in the comments.

Trees are written directly as ``Tree.to_dict()``-shaped dicts: ``thinktree.rewards`` must not need the search
package (one test builds a real ``Tree`` to check that the two forms agree).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from thinktree.rewards.labels import (
    as_tree_dict,
    math_shepherd_labels,
    mc_labels,
    ppm_pairs,
    rest_path_values,
    rest_value_labels,
    tree_evidence,
)


class B:
    """Builds a dict-form tree: ``add(parent, text, ...)`` returns the new node index."""

    def __init__(self, prompt: str = "Q: ", key: int = 0, backup: str = "mean"):
        self.d = {
            "format": 1,
            "prompt": prompt,
            "key": key,
            "meta": {},
            "backup": backup,
            "root_priors": None,
        }
        self.d["nodes"] = [self._node(-1, 0, None)]

    @staticmethod
    def _node(parent: int, depth: int, text: str | None) -> dict:
        step = (
            None
            if text is None
            else {"text": text, "token_ids": [], "logprobs": [], "prior": 1.0, "eos": False}
        )
        return {
            "parent": parent,
            "depth": depth,
            "step": step,
            "prior": 1.0,
            "children": [],
            "visits": 0,
            "evaluations": 0,
            "value_sum": 0.0,
            "max_value": None,
            "virtual_loss": 0,
            "terminal": False,
            "reward": None,
            "value": None,
            "rollout_rewards": [],
            "extra": {},
        }

    def add(self, parent, text, *, terminal=False, reward=None, q=None, visits=1, rollouts=()) -> int:
        nodes = self.d["nodes"]
        node = self._node(parent, nodes[parent]["depth"] + 1, text)
        node.update(terminal=terminal, reward=reward, rollout_rewards=list(rollouts))
        if q is not None:
            node.update(visits=visits, value_sum=q * visits, max_value=q)
        nodes.append(node)
        nodes[parent]["children"].append(len(nodes) - 1)
        return len(nodes) - 1


def tree_t1() -> tuple[dict, dict[str, int]]:
    """::

    root
    ├── a "A"
    │   ├── c "C"  terminal → 1
    │   └── d "D"  terminal → 0
    └── b "B"
        ├── e "E"  terminal → None (ungraded = 0)
        └── f "F"  open leaf, rollouts (1, 0)
    """
    b = B()
    n = {}
    n["a"] = b.add(0, "A")
    n["b"] = b.add(0, "B")
    n["c"] = b.add(n["a"], "C", terminal=True, reward=1.0)
    n["d"] = b.add(n["a"], "D", terminal=True, reward=0.0)
    n["e"] = b.add(n["b"], "E", terminal=True, reward=None)
    n["f"] = b.add(n["b"], "F", rollouts=(1.0, 0.0))
    return b.d, n


# -- Math-Shepherd -------------------------------------------------------------------------------------------------


def test_mc_labels_t1():
    # Evidence (outcomes below): a {c 1, d 0} → soft 1/2, hard ✓; b {e 0, f's rollouts 1, 0} → 1/3 ✓;
    # c {1} → 1 ✓; d {0} → 0 ✗; e {0} → 0 ✗; f {1, 0} → 1/2 ✓.
    d, n = tree_t1()
    lab = mc_labels(d)
    expect = {"a": (1 / 2, True), "b": (1 / 3, True), "c": (1.0, True), "d": (0.0, False), "e": (0.0, False)}
    expect["f"] = (1 / 2, True)
    assert lab.keys() == {n[k] for k in expect}
    for k, (soft, hard) in expect.items():
        assert lab[n[k]][0] == pytest.approx(soft) and lab[n[k]][1] is hard
    ev = tree_evidence(d)
    assert (ev[0].n, ev[0].correct, ev[0].leaves, ev[0].correct_leaves) == (5, 2, 3, 1)


def test_mc_labels_node_rollouts_count():
    # A rollout started at a itself (outcome 1) joins a's evidence: {1, 0, 1} → 2/3; c, d unchanged.
    d, n = tree_t1()
    d["nodes"][n["a"]]["rollout_rewards"] = [1.0]
    assert mc_labels(d)[n["a"]] == pytest.approx((2 / 3, True))
    # A node with no evidence gets no label.
    b = B()
    x = b.add(0, "X")
    y = b.add(0, "Y", terminal=True, reward=1.0)
    assert mc_labels(b.d) == {y: (1.0, True)} and x not in mc_labels(b.d)


def test_math_shepherd_records():
    d, n = tree_t1()
    recs, stats = math_shepherd_labels([d], kind="hard")
    # One record per terminal leaf (c, d, e), TRL stepwise format.
    assert [r["node"] for r in recs] == [n["c"], n["d"], n["e"]]
    assert recs[0] == {
        "prompt": "Q: ",
        "completions": ["A", "C"],
        "labels": [True, True],
        "key": 0,
        "node": n["c"],
    }
    assert recs[1]["labels"] == [True, False] and recs[2]["labels"] == [True, False]
    assert stats == dict(trees=1, no_terminal=0, all_correct=0, all_wrong=0, mixed=1, records=3, steps=6)
    recs, _ = math_shepherd_labels(d, kind="soft")
    assert recs[2]["completions"] == ["B", "E"] and recs[2]["labels"] == pytest.approx([1 / 3, 0.0])
    # include_open adds the path to the open leaf f (labelled by its rollouts).
    recs, _ = math_shepherd_labels(d, kind="soft", include_open=True)
    assert recs[-1]["node"] == n["f"] and recs[-1]["labels"] == pytest.approx([1 / 3, 1 / 2])
    with pytest.raises(ValueError):
        math_shepherd_labels(d, kind="both")


def test_threshold():
    # Leaf with reward 0.7: correct at 0.5, wrong at 0.8.
    b = B()
    a = b.add(0, "A")
    b.add(a, "B", terminal=True, reward=0.7)
    assert mc_labels(b.d)[a] == (1.0, True)
    assert mc_labels(b.d, threshold=0.8)[a] == (0.0, False)


# -- ReST-MCTS* ----------------------------------------------------------------------------------------------------


def tree_rest() -> tuple[dict, dict[str, int]]:
    """::

    root
    ├── s1
    │   ├── s2a ── s3a   terminal → 1      (correct path, K = 3)
    │   └── s2b ── s3b   terminal → 0
    └── t1
        ├── t2           terminal → 1      (t1's nearest correct leaf: distance 1)
        └── t3 ── t4     terminal → 0
             └── u4 ── u5 ── u6   terminal → 1  (a long correct detour under t3)
    """
    b = B()
    n = {}
    n["s1"] = b.add(0, "s1")
    n["s2a"] = b.add(n["s1"], "s2a")
    n["s3a"] = b.add(n["s2a"], "s3a", terminal=True, reward=1.0)
    n["s2b"] = b.add(n["s1"], "s2b")
    n["s3b"] = b.add(n["s2b"], "s3b", terminal=True, reward=0.0)
    n["t1"] = b.add(0, "t1")
    n["t2"] = b.add(n["t1"], "t2", terminal=True, reward=1.0)
    n["t3"] = b.add(n["t1"], "t3")
    n["t4"] = b.add(n["t3"], "t4", terminal=True, reward=0.0)
    n["u4"] = b.add(n["t3"], "u4")
    n["u5"] = b.add(n["u4"], "u5")
    n["u6"] = b.add(n["u5"], "u6", terminal=True, reward=1.0)
    return b.d, n


def test_rest_values_worked_examples():
    # v_k = clip(v_{k-1} + r_k (1 − v_{k-1}) / (m_k + 1)), v_0 = 0.
    d, n = tree_rest()
    # Correct path s1 s2a s3a (K = 3, m_k = K − k = 2, 1, 0; r = +1): v_k = k/K.
    #   v1 = 0 + 1/3 = 1/3;  v2 = 1/3 + (2/3)/2 = 2/3;  v3 = 2/3 + (1/3)/1 = 1.
    assert rest_path_values(d, n["s3a"]) == pytest.approx([1 / 3, 2 / 3, 1.0])
    # s1 s2b s3b: s1 as above (1/3); s2b has no correct leaf: r = −1, m = K − k = 1 → 1/3 − (2/3)/2 = 0;
    #   s3b: r = −1, m = 0 → max(0, 0 − 1) = 0.
    assert rest_path_values(d, n["s3b"]) == pytest.approx([1 / 3, 0.0, 0.0])
    # t1 t2: t1's nearest correct leaf is t2 (m = 1): 1/2; t2 correct (m = 0): 1/2 + 1/2 = 1.
    assert rest_path_values(d, n["t2"]) == pytest.approx([0.5, 1.0])
    # t1 t3 t4 (K = 3): t1 1/2; t3 has a correct leaf (u6) at distance 3: r = +1, m = 3 → 1/2 + (1/2)/4 = 5/8;
    #   t4 wrong: r = −1, m = 0 → max(0, 5/8 − 3/8) = 1/4 by the bare formula; a wrong terminal is pinned to 0.
    assert rest_path_values(d, n["t4"]) == pytest.approx([0.5, 5 / 8, 0.0])
    assert rest_path_values(d, n["t4"], pin_terminal=False) == pytest.approx([0.5, 5 / 8, 1 / 4])
    # t1 t3 u4 u5 u6: 1/2; t3 5/8; u4 (m = 2): 5/8 + (3/8)/3 = 3/4; u5 (m = 1): 3/4 + (1/4)/2 = 7/8; u6: 1.
    assert rest_path_values(d, n["u6"]) == pytest.approx([0.5, 5 / 8, 3 / 4, 7 / 8, 1.0])


def test_rest_decrease_without_clipping():
    # root ── x ── y ── z(wrong), and x ── w(correct): x: m = 1 → 1/2; y: r = −1, K = 3, k = 2 → m = 1:
    #   1/2 − (1/2)/2 = 1/4;  z: r = −1, m = 0 → max(0, 1/4 − 3/4) = 0.
    b = B()
    x = b.add(0, "x")
    y = b.add(x, "y")
    z = b.add(y, "z", terminal=True, reward=0.0)
    b.add(x, "w", terminal=True, reward=1.0)
    assert rest_path_values(b.d, z) == pytest.approx([0.5, 0.25, 0.0])


def test_rest_value_records():
    d, n = tree_rest()
    recs, stats = rest_value_labels(d)
    assert [r["node"] for r in recs] == [n[k] for k in ("s3a", "s3b", "t2", "t4", "u6")]
    assert recs[0]["completions"] == ["s1", "s2a", "s3a"] and recs[0]["labels"] == pytest.approx(
        [1 / 3, 2 / 3, 1]
    )
    assert stats["records"] == 5 and stats["mixed"] == 1 and stats["steps"] == 3 + 3 + 2 + 3 + 5
    for r in recs:  # correct terminal → 1, wrong terminal → 0, all in [0, 1]
        assert all(0.0 <= v <= 1.0 for v in r["labels"])
        assert r["labels"][-1] == (1.0 if d["nodes"][r["node"]]["reward"] == 1.0 else 0.0)


# -- rStar-Math PPM pairs ------------------------------------------------------------------------------------------


def tree_ppm() -> tuple[dict, dict[str, int]]:
    """Q values; '+' = reaches a correct leaf, '−' = only wrong leaves::

        root
        ├── a .9  + ── a1 terminal → 1
        ├── b .7  + ── b1 terminal → 1 (Q 1.0), b2 terminal → 0 (Q 0.0)
        ├── c .6  + ── c1 terminal → 1
        ├── d .3  − ── d1 terminal → 0
        ├── e .75 − ── e1 terminal → 0
        ├── f .8  − ── f1 terminal → 0
        └── g .1     (open, no terminal leaf: neither + nor −)

    Root: positives top-2 by Q = a (.9), b (.7); negatives bottom-2 = d (.3), e (.75).
    Combinations: a–d .6 ✓, a–e .15 ✓, b–d .4 ✓, b–e −.05 ✗ (dropped). At b: b1–b2 gap 1 ✓. Total 4 pairs.
    """
    bld = B(prompt="P|", key=5)
    n = {}
    for name, q in [("a", 0.9), ("b", 0.7), ("c", 0.6), ("d", 0.3), ("e", 0.75), ("f", 0.8), ("g", 0.1)]:
        n[name] = bld.add(0, name.upper(), q=q, visits=4)
    bld.add(n["a"], "a1", terminal=True, reward=1.0, q=1.0)
    n["b1"] = bld.add(n["b"], "b1", terminal=True, reward=1.0, q=1.0)
    n["b2"] = bld.add(n["b"], "b2", terminal=True, reward=0.0, q=0.0)
    bld.add(n["c"], "c1", terminal=True, reward=1.0, q=1.0)
    bld.add(n["d"], "d1", terminal=True, reward=0.0, q=0.0)
    bld.add(n["e"], "e1", terminal=True, reward=0.0, q=0.0)
    bld.add(n["f"], "f1", terminal=True, reward=0.0, q=0.0)
    return bld.d, n


def test_ppm_pairs_worked_example():
    d, n = tree_ppm()
    recs, stats = ppm_pairs(d)
    got = [(r["chosen"], r["rejected"]) for r in recs]
    assert got == [("A", "D"), ("A", "E"), ("B", "D"), ("b1", "b2")]
    assert recs[0]["prompt"] == "P|" and recs[3]["prompt"] == "P|B" and recs[3]["node"] == n["b"]
    assert recs[1]["q_chosen"] == pytest.approx(0.9) and recs[1]["q_rejected"] == pytest.approx(0.75)
    assert (
        stats["pairs"] == 4 and stats["dropped_margin"] == 1 and stats["nodes"] == 2 and stats["mixed"] == 1
    )
    # top=1: a–d at the root, b1–b2 at b.
    recs, _ = ppm_pairs(d, top=1)
    assert [(r["chosen"], r["rejected"]) for r in recs] == [("A", "D"), ("b1", "b2")]


def test_ppm_max_backup():
    # backup="max": Q = max_value (the builder sets max_value = q, so the same pairs come out).
    d, _ = tree_ppm()
    d["backup"] = "max"
    for node in d["nodes"][1:]:
        node["value_sum"] = 0.0  # mean backup would now give Q = 0 everywhere
    recs, _ = ppm_pairs(d)
    assert len(recs) == 4


def test_bad_trees_counted():
    empty = B(key=1)  # root only
    open_only = B(key=2)
    open_only.add(0, "X", rollouts=(1.0,))  # evidence but no terminal leaf
    all_right = B(key=3)
    a = all_right.add(0, "A", q=0.5)
    all_right.add(a, "B", terminal=True, reward=1.0, q=1.0)
    all_right.add(a, "C", terminal=True, reward=1.0, q=0.9)
    all_wrong = B(key=4)
    all_wrong.add(0, "A", terminal=True, reward=0.0, q=0.0)
    all_wrong.add(0, "B", terminal=True, reward=None, q=0.2)
    trees = [empty.d, open_only.d, all_right.d, all_wrong.d]

    recs, stats = ppm_pairs(trees)
    assert recs == []
    counts = dict(trees=4, no_terminal=2, all_correct=1, all_wrong=1, mixed=0, records=0)
    assert stats == counts | dict(pairs=0, dropped_margin=0, nodes=0)
    recs, stats = math_shepherd_labels(trees)
    assert [r["key"] for r in recs] == [3, 3, 4, 4] and stats["no_terminal"] == 2
    assert [r["labels"] for r in recs] == [[True, True], [True, True], [False], [False]]
    recs, stats = rest_value_labels(trees)
    assert [r["labels"] for r in recs] == [[0.5, 1.0], [0.5, 1.0], [0.0], [0.0]] and stats["records"] == 4
    empty_stats = dict(trees=0, no_terminal=0, all_correct=0, all_wrong=0, mixed=0, records=0, steps=0)
    assert math_shepherd_labels([]) == ([], empty_stats)


# -- input forms ---------------------------------------------------------------------------------------------------


def test_input_forms_agree():
    from thinktree.search.tree import Tree  # only the test touches the search package

    d, _ = tree_ppm()
    tree = Tree.from_dict(d)
    line = json.dumps(d)
    ref = ppm_pairs(d)
    assert ppm_pairs(tree) == ref and ppm_pairs(line) == ref and ppm_pairs([line, tree])[1]["pairs"] == 8
    assert math_shepherd_labels(tree) == math_shepherd_labels(d)
    with pytest.raises(TypeError):
        as_tree_dict(42)
    with pytest.raises(ValueError, match="not a tree"):
        as_tree_dict({"nodes": []})
    bad = json.loads(line)
    bad["nodes"][1]["parent"] = 5  # parent after child: not creation order
    with pytest.raises(ValueError, match="creation order"):
        tree_evidence(bad)


def test_rewards_labels_does_not_import_search_or_trainer():
    code = (
        "import sys, thinktree.rewards.labels; "
        "bad = [m for m in sys.modules if m.startswith(('thinktree.search', 'thinktree.trainer', 'torch'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
