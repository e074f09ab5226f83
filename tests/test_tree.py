"""Tree structure, statistics, expansion/backup primitives and exact JSON round trips."""

import json

import pytest

from thinktree.search.mcts import add_virtual_loss, backup, expand
from thinktree.search.toy import make_step
from thinktree.search.tree import NO_PARENT, ROOT, Node, Tree
from thinktree.search.types import StepRecord, Trajectory


def small_tree() -> Tree:
    """root → a (→ a1 eos, a2), b (eos)."""
    tree = Tree.from_prompt(Trajectory("Q: 1+1?", key=7, meta={"answer": "2"}))
    a = tree.add_child(ROOT, make_step(" a", 0.6), 0.6, terminal=False)
    tree.add_child(ROOT, make_step(" b=2", 0.4, eos=True), 0.4, terminal=True)
    tree.add_child(a, make_step(" a1=2", 0.5, eos=True), 0.5, terminal=True)
    tree.add_child(a, make_step(" a2", 0.5), 0.5, terminal=False)
    return tree


def test_constants_and_root():
    tree = Tree(prompt="p")
    assert ROOT == 0 and NO_PARENT == -1
    assert len(tree) == 1
    root = tree.nodes[ROOT]
    assert root.parent == NO_PARENT and root.step is None and root.depth == 0 and root.children == []


def test_structure_queries():
    tree = small_tree()
    assert [n.parent for n in tree.nodes] == [NO_PARENT, 0, 0, 1, 1]
    assert [n.depth for n in tree.nodes] == [0, 1, 1, 2, 2]
    assert tree.path(3) == [0, 1, 3]
    assert tree.path(ROOT) == [ROOT]
    assert tree.leaves() == [2, 3, 4]
    assert tree.terminal_leaves() == [2, 3]
    assert tree.open_leaves() == [4]


def test_trajectory_extends_parent():
    tree = small_tree()
    t3 = tree.trajectory(3)
    assert t3.prompt == "Q: 1+1?" and t3.key == 7 and t3.meta == {"answer": "2"}
    assert t3.completion == " a a1=2" and t3.done and t3.num_tokens == len(" a a1=2")
    for i, node in enumerate(tree.nodes[1:], start=1):
        assert tree.trajectory(i) == tree.trajectory(node.parent).extend(node.step)
    assert tree.trajectory(ROOT).steps == ()


def test_from_prompt_rejects_steps():
    with pytest.raises(ValueError, match="already has 1 steps"):
        Tree.from_prompt(Trajectory("p", (make_step("x"),)))


def test_backup_mean_and_max():
    tree = small_tree()
    backup(tree, [0, 1, 3], 1.0)
    backup(tree, [0, 2], 0.0)
    backup(tree, [0, 1, 4], 0.5)
    root, a = tree.nodes[0], tree.nodes[1]
    assert (root.visits, root.value_sum, root.max_value) == (3, 1.5, 1.0)
    assert (a.visits, a.value_sum) == (2, 1.5)
    assert tree.nodes[3].evaluations == 1 and tree.nodes[3].value == 1.0
    assert root.evaluations == 0
    assert tree.q(1) == 0.75 and tree.q(0) == 0.5 and tree.q(4) == 0.5
    assert tree.q(ROOT) == pytest.approx(0.5)
    tree.backup = "max"
    assert tree.q(0) == 1.0 and tree.q(1) == 1.0 and tree.q(2) == 0.0


def test_q_of_unvisited_is_zero():
    assert small_tree().q(3) == 0.0


def test_virtual_loss_add_remove():
    tree = small_tree()
    add_virtual_loss(tree, [0, 1, 3])
    add_virtual_loss(tree, [0, 2])
    assert [n.virtual_loss for n in tree.nodes] == [2, 1, 1, 1, 0]
    add_virtual_loss(tree, [0, 1, 3], -1)
    add_virtual_loss(tree, [0, 2], -1)
    assert all(n.virtual_loss == 0 for n in tree.nodes)


def test_expand_merges_duplicates_and_normalises():
    tree = Tree(prompt="p")
    steps = [
        make_step(" x", 0.2),
        make_step(" y", 0.3),
        make_step(" x", 0.1),
        make_step(" z=1", 0.4, eos=True),
    ]
    expand(tree, ROOT, steps, max_depth=5)
    kids = tree.nodes[ROOT].children
    assert [tree.nodes[c].step.text for c in kids] == [" x", " y", " z=1"]
    assert [tree.nodes[c].prior for c in kids] == pytest.approx([0.3, 0.3, 0.4])
    assert sum(tree.nodes[c].prior for c in kids) == pytest.approx(1.0)
    assert [tree.nodes[c].terminal for c in kids] == [False, False, True]
    assert all(tree.nodes[c].visits == 0 for c in kids)


def test_expand_terminal_at_max_depth_and_zero_priors():
    tree = Tree(prompt="p")
    expand(tree, ROOT, [make_step(" x", 0.0), make_step(" y", 0.0)], max_depth=1)
    kids = tree.nodes[ROOT].children
    assert all(tree.nodes[c].terminal for c in kids)
    assert [tree.nodes[c].prior for c in kids] == [0.5, 0.5]


def test_json_round_trip_exact():
    tree = small_tree()
    backup(tree, [0, 1, 3], 1 / 3)
    backup(tree, [0, 2], 0.1 + 0.2)
    tree.nodes[1].rollout_rewards.extend([0.1, 2 / 7])
    tree.nodes[1].extra["prm"] = [0.25, 1e-17]
    tree.nodes[3].reward = 1.0
    tree.root_priors = [0.7, 0.30000000000000004]
    text = tree.to_json()
    back = Tree.from_json(text)
    assert back == tree
    assert back.to_json() == text
    assert json.loads(text)["format"] == 1
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_json_rejects_unknown_format():
    d = small_tree().to_dict()
    d["format"] = 99
    with pytest.raises(ValueError, match="unsupported format"):
        Tree.from_dict(d)


def test_node_dict_round_trip():
    node = Node(parent=3, depth=2, step=StepRecord("s", (1, 2), (-0.1, -0.2), 0.86, eos=True), prior=0.25)
    assert Node.from_dict(node.to_dict()) == node


def test_child_priors_uses_root_noise():
    tree = small_tree()
    assert tree.child_priors(ROOT) == [0.6, 0.4]
    tree.root_priors = [0.1, 0.9]
    assert tree.child_priors(ROOT) == [0.1, 0.9]
    assert tree.child_priors(1) == [0.5, 0.5]
