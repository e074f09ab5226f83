"""Bad input gives clear errors, never hangs."""

import math

import numpy as np
import pytest

from thinktree.search import MCTSConfig, Trajectory, search
from thinktree.search.toy import ArithmeticWorld, NeverEndingWorld, make_step

WORLD = ArithmeticWorld()
P = [Trajectory("p", key=0)]


def run(proposer=WORLD, prompts=P, outcome_fn=WORLD.outcome_fn, **kwargs):
    config = kwargs.pop("config", MCTSConfig(num_simulations=4, num_children=2))
    return search(prompts, proposer, outcome_fn, config=config, rng=np.random.default_rng(0), **kwargs)


class BadProposer:
    """Returns ``make(prefixes, num_children)`` instead of real proposals."""

    def __init__(self, make):
        self.make = make

    def propose(self, prefixes, num_children, seeds):
        return self.make(prefixes, num_children)


def test_empty_prompt_list():
    with pytest.raises(ValueError, match="empty prompt list"):
        run(prompts=[])


def test_duplicate_keys_and_prompts_with_steps():
    with pytest.raises(ValueError, match="duplicate prompt key 0"):
        run(prompts=[Trajectory("a"), Trajectory("b")])
    with pytest.raises(ValueError, match="already has 1 steps"):
        run(prompts=[Trajectory("a", (make_step("x"),))])
    with pytest.raises(ValueError, match="Trajectory objects"):
        run(prompts=["just a string"])


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_simulations", 0),
        ("num_simulations", -3),
        ("num_children", 0),
        ("in_flight", 0),
        ("num_rollouts", 0),
        ("max_depth", 0),
        ("token_budget", 0),
        ("select", "ucb2"),
        ("evaluation", "oracle"),
        ("backup", "min"),
        ("fill_q", "one"),
        ("answer_selection", "longest"),
        ("lambda_mix", 1.5),
        ("dirichlet_fraction", -0.1),
        ("pb_c_base", 0.0),
        ("dirichlet_alpha", 0.0),
        ("c_puct", -1.0),
        ("num_simulations", 2.5),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MCTSConfig(**{field: value})


def test_config_is_not_a_dict():
    with pytest.raises(TypeError, match="MCTSConfig"):
        run(config={"num_simulations": 3})


def test_missing_value_or_answer_fn():
    with pytest.raises(ValueError, match="needs a value_fn"):
        run(config=MCTSConfig(evaluation="value"))
    with pytest.raises(ValueError, match="needs an answer_fn"):
        run(config=MCTSConfig(answer_selection="majority"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ps, n: [], "returned 0 step lists for 1 prefixes"),
        (lambda ps, n: [[make_step("x")] * n] * (len(ps) + 1), "returned 2 step lists for 1 prefixes"),
        (lambda ps, n: [[] for _ in ps], "returned no steps"),
        (lambda ps, n: [[make_step("x")] * (n + 1) for _ in ps], "expected num_children=2"),
        (lambda ps, n: [["text"] * n for _ in ps], "non-StepRecord"),
        (lambda ps, n: None, "returned NoneType step lists"),
    ],
)
def test_bad_proposer_output(make, message):
    with pytest.raises(RuntimeError, match="proposer BadProposer") as info:
        run(proposer=BadProposer(make))
    assert message in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1.5, "high"])
def test_value_fn_bad_values_name_the_trajectory(bad):
    def value_fn(trajectories):
        return [bad for _ in trajectories]

    with pytest.raises(ValueError, match=r"value_fn returned .* for trajectory key=0"):
        run(config=MCTSConfig(num_simulations=2, evaluation="value"), value_fn=value_fn)


def test_value_fn_wrong_length():
    with pytest.raises(RuntimeError, match="value_fn .* returned 0 scores for 1 trajectories"):
        run(config=MCTSConfig(num_simulations=2, evaluation="value"), value_fn=lambda ts: [])


def test_outcome_fn_nan_and_none():
    with pytest.raises(ValueError, match="outcome_fn returned non-finite nan"):
        run(outcome_fn=lambda ts: [math.nan] * len(ts))
    [r] = run(outcome_fn=lambda ts: [None] * len(ts))  # None → graded 0
    assert all(r.tree.nodes[i].reward in (None, 0.0) for i in r.tree.terminal_leaves())


def test_value_fn_numpy_output_is_accepted():
    [r] = run(
        config=MCTSConfig(num_simulations=3, evaluation="value"), value_fn=lambda ts: np.full(len(ts), 0.5)
    )
    assert r.tree.nodes[0].visits == 4


@pytest.mark.parametrize("evaluation", ["rollout", "value"])
def test_never_ending_proposer_is_bounded_by_max_depth(evaluation):
    world = NeverEndingWorld()
    config = MCTSConfig(num_simulations=60, num_children=2, max_depth=3, evaluation=evaluation, in_flight=3)
    [r] = run(proposer=world, outcome_fn=world.outcome_fn, value_fn=world.value_fn, config=config)
    assert max(n.depth for n in r.tree.nodes) == 3
    assert all(n.terminal for n in r.tree.nodes if n.depth == 3)
    assert r.tree.nodes[r.node].terminal and r.reward == 0.0


def test_rng_must_be_a_generator():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        search(P, WORLD, WORLD.outcome_fn, config=MCTSConfig(num_simulations=2), rng=0)
