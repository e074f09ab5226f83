"""``thinktree ablate`` and compute-optimal allocation: grid expansion and its errors, reports, resume, the output-dir
guard (grid logic with a fake ``run_cell``), the allocation rules, equal total compute on a toy world, and a
compute-optimal cell end to end on a tiny random model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from thinktree.search.toy import ToyWorld, make_step
from thinktree.search.types import Trajectory
from thinktree.trainer import ablate
from thinktree.trainer.allocation import (
    allocate,
    difficulty_bin,
    probe_difficulty,
    rule_weight,
    run_compute_optimal,
)
from thinktree.trainer.cli import main
from thinktree.trainer.config import ConfigError, SearchConfig, load_config

TINY = [
    "model.policy=tiny:llama",
    "task.name=arith",
    "task.kwargs={ops: [2, 2], digits: 1}",
    "task.train_size=16",
    "task.eval_size=3",
    "search.max_depth=3",
    "search.max_step_tokens=8",
    "search.num_children=2",
    "output.report_to=[]",
]
GRID = (
    "ablate.cells=[{method: greedy}, {method: self_consistency, budget: [1, 2]},"
    " {method: mcts, num_simulations: [2, 4], c_puct: [1.0, 2.0]}]"
)


def _cfg(tmp_path, *extra: str):
    return load_config(None, [*TINY, f"output.dir={tmp_path}", *extra])


# ------------------------------------------------------------------------------------------------ grid expansion


def test_grid_expands_each_cell_as_a_cartesian_product():
    spec = load_config(None, [GRID]).ablate.cells
    cells = ablate.expand_grid(spec, SearchConfig())
    assert [c.method for c in cells] == ["greedy"] + ["self_consistency"] * 2 + ["mcts"] * 4
    assert [c.search.num_samples for c in cells[1:3]] == [1, 2]  # "budget" is num_samples for best-of-N
    assert {(c.search.num_simulations, c.search.c_puct) for c in cells[3:]} == {
        (2, 1.0),
        (2, 2.0),
        (4, 1.0),
        (4, 2.0),
    }
    assert cells[3].budget == 2 and cells[0].budget is None
    assert cells[3].label() == "mcts (c_puct=1.0)"
    co = ablate.expand_grid(
        [{"method": "compute_optimal", "rule": ["snell", "uniform"], "total_budget": [4, 8]}], SearchConfig()
    )
    assert [(dict(c.options)["rule"], c.budget) for c in co] == [
        ("snell", 4),
        ("snell", 8),
        ("uniform", 4),
        ("uniform", 8),
    ]


@pytest.mark.parametrize(
    "spec, match",
    [
        ([], "empty"),
        ([{"method": "mtcs", "num_simulations": [2]}], "unknown method 'mtcs'"),
        (
            [{"method": "mcts", "num_simulation": [2]}],
            "unknown field 'num_simulation'.*did you mean 'num_simulations'",
        ),
        (
            [{"method": "self_consistency", "c_puct": [1.0]}],
            "unknown field 'c_puct' for method 'self_consistency'",
        ),
        ([{"method": "greedy", "budget": [1, 2]}], "no budget"),
        ([{"method": "mcts", "budget": [1], "num_simulations": [2]}], "not both"),
        ([{"method": "mcts", "evaluation": ["sometimes"]}], "evaluation"),
        ([{"method": "mcts", "num_simulations": []}], "empty list"),
        ([{"num_simulations": [2]}], "'method' key"),
        ([{"method": "compute_optimal", "rule": "snell"}], "needs total_budget"),
        (
            [{"method": "compute_optimal", "total_budget": 2, "probe_samples": 4}],
            "smaller than probe_samples",
        ),
        ([{"method": "compute_optimal", "total_budget": 8, "rule": "oracle"}], "unknown rule 'oracle'"),
        ([{"method": "compute_optimal", "total_budget": 8, "base_method": "greedy"}], "unknown base_method"),
    ],
)
def test_bad_grids_are_config_errors_naming_the_problem(spec, match):
    with pytest.raises(ConfigError, match=match):
        ablate.expand_grid(spec, SearchConfig())


def test_value_cells_without_a_prm_fail_before_anything_is_written(tmp_path):
    cfg = _cfg(tmp_path / "out", "ablate.cells=[{method: weighted_bon, num_samples: [2]}]")
    with pytest.raises(ConfigError, match="need a PRM"):
        ablate.run_ablate_command(cfg)
    assert not (tmp_path / "out").exists()
    assert main(["ablate", *TINY, f"output.dir={tmp_path}/out", "ablate.cells=[]"]) == 2


# ------------------------------------------------------------------------------------- reports, resume, guard


@pytest.fixture
def fake_cells(monkeypatch):
    """Replace ``run_cell`` by a fake whose accuracy grows with the budget; records the cells it ran."""
    calls: list[str] = []

    def fake(cell, ctx):
        calls.append(cell.label())
        b = cell.budget or 1
        return {"accuracy": min(1.0, 0.1 * b), "pass_at_k": min(1.0, 0.2 * b), "generated_tokens": 30 * b * len(ctx.prompts),
                "tokens_per_prompt": 30.0 * b, "wall_time_s": 0.01, "cpu_time_s": 0.01}  # fmt: skip

    monkeypatch.setattr(ablate, "run_cell", fake)
    return calls


def test_reports_are_written_and_a_rerun_skips_finished_cells(tmp_path, fake_cells):
    cfg = _cfg(tmp_path, GRID)
    rows = ablate.run_ablate_command(cfg)
    assert len(fake_cells) == len(rows) == 7
    out = tmp_path / "ablate"
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and {"method", "budget", "c_puct", "accuracy", "pass_at_k", "generated_tokens",
                                "tokens_per_prompt", "wall_time_s"} <= set(table[0])  # fmt: skip
    assert table[3]["c_puct"] == "1.0" and table[1]["c_puct"] == ""  # c_puct only where the method uses it
    md = (out / "results.md").read_text()
    assert md.count("\n| mcts |") == 4 and "accuracy %" in md
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    fake_cells.clear()
    assert len(ablate.run_ablate_command(cfg)) == 7
    assert fake_cells == []  # everything was already done


def test_an_interrupted_grid_resumes_at_the_first_unfinished_cell(tmp_path, fake_cells, monkeypatch):
    cfg = _cfg(tmp_path, GRID)
    inner = ablate.run_cell

    def crashing(cell, ctx):
        if len(fake_cells) == 3:
            raise KeyboardInterrupt
        return inner(cell, ctx)

    monkeypatch.setattr(ablate, "run_cell", crashing)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablate_command(cfg)
    with open(tmp_path / "ablate" / "cells.jsonl", "a") as f:
        f.write('{"key": "torn li')  # a write killed half-way
    monkeypatch.setattr(ablate, "run_cell", inner)
    fake_cells.clear()
    assert len(ablate.run_ablate_command(cfg)) == 7
    assert len(fake_cells) == 4
    lines = (tmp_path / "ablate" / "cells.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if line.startswith('{"key": "') and line.endswith("}")) == 7


def test_an_output_dir_of_a_different_recipe_is_refused_and_left_alone(tmp_path, fake_cells):
    ablate.run_ablate_command(_cfg(tmp_path, GRID))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ablate").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="different recipe"):
        ablate.run_ablate_command(_cfg(tmp_path, GRID, "task.eval_size=4"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ablate").iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------------------- allocation


def test_allocate_spends_exactly_the_total_and_follows_the_rule():
    difficulty = [0.0, 0.0, 0.5, 0.5, 0.9, 0.9]  # bins: easy, easy, medium, medium, hard, hard
    assert [difficulty_bin(d, 3) for d in difficulty] == [0, 0, 1, 1, 2, 2]
    for rule in ("snell", "uncertainty", "uniform"):
        for total in (0, 1, 7, 24, 101):
            alloc = allocate(difficulty, total, rule, num_bins=3)
            assert sum(alloc) == total and min(alloc) >= 0
    snell = allocate(difficulty, 24, "snell")
    assert snell[2] > snell[4] > snell[0]  # medium most, hopeless less, easy least
    greedy = allocate(difficulty, 24, "uncertainty")
    assert greedy[0] < greedy[2] < greedy[4]  # monotone in uncertainty
    assert set(allocate(difficulty, 24, "uniform")) == {4}
    assert max(allocate(difficulty, 25, "uniform")) - min(allocate(difficulty, 25, "uniform")) == 1
    with pytest.raises(ValueError, match="unknown allocation rule"):
        allocate(difficulty, 4, "oracle")


def test_probe_difficulty_is_one_minus_majority_agreement_or_prm_confidence():
    probes = [
        [("3", 1.0, 0.9)] * 4,  # unanimous
        [("3", 1.0, 0.5), ("3", 1.0, 0.5), ("4", 0.0, 0.5), (None, 0.0, 0.5)],
        [(None, 0.0, 0.1)] * 4,  # no answer at all
    ]
    assert probe_difficulty(probes) == [0.0, 0.5, 1.0]
    assert probe_difficulty(probes, use_value=True) == pytest.approx([0.1, 0.5, 0.9])


class CoinWorld(ToyWorld):
    """Each sample is one EOS step ``A<answer>`` (2 tokens): the right answer 1 with the prompt's probability p."""

    def children(self, prefix, num_children, rng):
        p = prefix.meta["p"]
        return [
            make_step("A1" if rng.random() < p else f"A{rng.integers(2, 10)}", eos=True)
            for _ in range(num_children)
        ]


def test_every_rule_spends_the_same_total_samples_on_a_toy_world():
    prompts = [
        Trajectory(prompt=f"q{i}", key=i, meta={"p": p}) for i, p in enumerate([1.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    ]

    def outcome(trajs):
        return [1.0 if t.completion == "A1" else 0.0 for t in trajs]

    runs = {}
    for rule in ("snell", "uncertainty", "uniform"):
        runs[rule] = run_compute_optimal(
            prompts, CoinWorld(), outcome, SearchConfig(max_depth=2), np.random.default_rng(0),
            base_method="self_consistency", total_budget=8, rule=rule, probe_samples=4,
            answer_fn=lambda c: c[1:] or None,
        )  # fmt: skip
        assert runs[rule]["generated_tokens"] == 2 * 8 * len(
            prompts
        )  # probe + extra = total_budget samples each
        assert sum(runs[rule]["allocation"]["extra"]) == (8 - 4) * len(prompts)
    for rule in ("snell", "uncertainty"):  # a bin with a larger weight never gets less per prompt
        alloc = runs[rule]["allocation"]
        weight = [rule_weight(rule, (difficulty_bin(d, 3) + 0.5) / 3) for d in alloc["difficulty"]]
        for i in range(6):
            for j in range(6):
                if weight[i] > weight[j]:
                    assert alloc["extra"][i] >= alloc["extra"][j]
    extra = runs["snell"]["allocation"]["extra"]
    assert extra[0] == extra[1] == min(extra) < max(extra)  # the unanimous p = 1 prompts get the least
    assert runs["uniform"]["allocation"]["extra"] == [4] * 6
    assert 2 / 6 <= runs["uniform"]["accuracy"] <= 4 / 6  # p = 1 always right, p = 0 never


# --------------------------------------------------------------------------------------------- end to end


def test_compute_optimal_cells_run_end_to_end_on_a_tiny_model(tmp_path):
    cells = (
        "ablate.cells=[{method: self_consistency, num_samples: 3},"
        " {method: compute_optimal, total_budget: 3, probe_samples: 2, rule: [snell, uniform]},"
        " {method: compute_optimal, base_method: mcts, total_budget: 3, probe_samples: 2}]"
    )
    assert main(["ablate", *TINY, f"output.dir={tmp_path}", cells]) == 0
    records = [json.loads(line) for line in (tmp_path / "ablate" / "cells.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["self_consistency"] + ["compute_optimal"] * 3
    for r in records[1:]:
        assert sum(r["metrics"]["allocation"]["extra"]) == (3 - 2) * 3
        assert r["metrics"]["generated_tokens"] > 0 and 0.0 <= r["metrics"]["accuracy"] <= 1.0
    assert (tmp_path / "ablate" / "accuracy_vs_tokens.png").exists()
