"""With a tiny real model, batching and caching change the speed of a search, never its result: full MCTS (and a
baseline) with the batched, prefix-cached HF backend builds byte-identical trees to the anchors' sequential design
(one leaf per forward batch, no cache, every prefix re-encoded): the same steps, token ids, visits and rewards, with
float statistics (logprobs, priors, Q) equal up to float64 rounding of differently padded batches."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from thinktree.rewards import get_task
from thinktree.search.backends.hf import HFStepProposer
from thinktree.search.baselines import step_beam
from thinktree.search.mcts import MCTSConfig, search
from thinktree.trainer.searching import make_outcome_fn, make_prompts
from thinktree.trainer.tiny import build_tiny_model


@pytest.fixture(scope="module")
def setup():
    model, tok = build_tiny_model("llama", seed=3)
    model = model.double().eval()  # float64: padding/batching noise far below any sampling decision
    task = get_task("arith", ops=(2, 2), digits=1)
    prompts = make_prompts(task, task.load("test", n=3, seed=0))
    return model, tok, task, prompts


def assert_same_tree(a: str, b: str, tol: float = 1e-9) -> None:
    def walk(x, y, where="tree"):
        if isinstance(x, float) or isinstance(y, float):
            assert math.isclose(x, y, rel_tol=tol, abs_tol=tol), f"{where}: {x} != {y}"
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), f"{where}: lengths {len(x)} != {len(y)}"
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{where}[{i}]")
        else:
            assert x == y, f"{where}: {x!r} != {y!r}"

    walk(json.loads(a), json.loads(b))


def _proposers(model, tok):
    fast = HFStepProposer(model, tok, max_step_tokens=8, max_batch_size=64, cache=True)
    slow = HFStepProposer(model, tok, max_step_tokens=8, max_batch_size=1, cache=False)
    return fast, slow


def test_mcts_trees_equal_sequential_uncached_search(setup):
    model, tok, task, prompts = setup
    cfg = MCTSConfig(num_simulations=5, num_children=3, in_flight=3, max_depth=3)
    fast, slow = _proposers(model, tok)
    with torch.inference_mode():
        a = search(prompts, fast, make_outcome_fn(task), config=cfg, rng=np.random.default_rng(7))
        b = search(prompts, slow, make_outcome_fn(task), config=cfg, rng=np.random.default_rng(7))
    assert len(a) == len(b) == len(prompts)
    for x, y in zip(a, b):
        assert_same_tree(x.tree.to_json(), y.tree.to_json())
        assert x.answer == y.answer and x.node == y.node
    # the fast path really batched and cached: fewer forward passes, (almost) no prefix token re-encoded — at most
    # the one last token of a step whose cache entry was extended by a rollout before the step was expanded
    assert fast.stats["forward_passes"] < slow.stats["forward_passes"]
    assert fast.stats["reencoded_tokens"] <= 0.1 * fast.stats["generated_tokens"]
    assert slow.stats["reencoded_tokens"] > 20 * max(1, fast.stats["reencoded_tokens"])


def test_step_beam_equal_sequential(setup):
    model, tok, task, prompts = setup
    fast, slow = _proposers(model, tok)
    with torch.inference_mode():
        a = step_beam(
            prompts,
            fast,
            make_outcome_fn(task),
            rng=np.random.default_rng(1),
            beam_width=2,
            expansions=2,
            max_depth=3,
        )
        b = step_beam(
            prompts,
            slow,
            make_outcome_fn(task),
            rng=np.random.default_rng(1),
            beam_width=2,
            expansions=2,
            max_depth=3,
        )
    for x, y in zip(a, b):
        assert_same_tree(x.tree.to_json(), y.tree.to_json())
