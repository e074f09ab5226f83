"""Recipe config: YAML ↔ dataclasses round trip, strict keys, CLI overrides, every shipped recipe parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from thinktree.trainer.config import (
    ConfigError,
    RecipeConfig,
    SearchConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    normalise_cli_overrides,
    save_config,
)
from thinktree.trainer.outputs import prepare_output_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_round_trip(tmp_path):
    cfg = load_config(ROOT / "recipes" / "quickstart.yaml", ["search.num_simulations=7", "seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert again.search.num_simulations == 7 and again.seed == 3


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(
        ConfigError, match=r"unknown key search\.'num_simulation'.*did you mean 'num_simulations'"
    ):
        config_from_dict({"search": {"num_simulation": 3}})
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        config_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["rounds.warm_start.stepz=3"])


def test_type_errors_name_the_field():
    with pytest.raises(ConfigError, match="search.num_children: expected int"):
        config_from_dict({"search": {"num_children": "four"}})
    with pytest.raises(ConfigError, match="seed: expected int"):
        config_from_dict({"seed": True})
    # MCTSConfig's own validation surfaces as a ConfigError too
    with pytest.raises(ConfigError, match="num_simulations"):
        config_from_dict({"search": {"num_simulations": 0}})


def test_overrides_parse_yaml_values_and_dash_form():
    items = normalise_cli_overrides(
        ["--search.c_puct", "2.5", "--task.kwargs={ops: [2, 2]}", "model.lora=null"]
    )
    cfg = load_config(None, items)
    assert cfg.search.c_puct == 2.5 and isinstance(cfg.search, SearchConfig)
    assert cfg.task.kwargs == {"ops": [2, 2]}
    assert cfg.model.lora is None
    assert (
        load_config(None, ["train.learning_rate=5e-5"]).train.learning_rate == 5e-5
    )  # YAML 1.1 reads a string
    with pytest.raises(ConfigError, match="no value"):
        normalise_cli_overrides(["--seed"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["seed"])


def test_search_section_maps_onto_mcts_config():
    cfg = load_config(None, ["search.num_simulations=5", "search.evaluation=rollout"])
    mcts = cfg.search.mcts()
    assert type(mcts).__name__ == "MCTSConfig" and mcts.num_simulations == 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    assert isinstance(load_config(path), RecipeConfig)


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"NO", "MULTI_GPU", "DEEPSPEED", "MULTI_CPU"}
    assert isinstance(data["num_processes"], int) and data["num_processes"] >= 1
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(path))  # accelerate's own parser accepts it


def test_output_dir_refuses_a_different_recipe(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}"])
    out = prepare_output_dir(cfg)
    stored = (out / "config.yaml").read_text()
    assert prepare_output_dir(cfg) == out  # same recipe: resume is fine
    other = load_config(None, [f"output.dir={tmp_path / 'run'}", "search.num_simulations=99"])
    with pytest.raises(ConfigError, match=r"different recipe.*search.num_simulations: 32 → 99"):
        prepare_output_dir(other)
    assert (out / "config.yaml").read_text() == stored  # nothing overwritten


def test_cli_reports_config_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "thinktree.trainer.cli", "train", "search.bogus=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown key search.'bogus'" in proc.stderr
