"""Import contracts: the search core loads no ML framework, rewards and search don't reach into each other or
trainer, and only trainer imports trl/accelerate/deepspeed/peft (checked by import-linter and at runtime)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
HEAVY = ("torch", "transformers", "trl", "accelerate", "deepspeed", "peft")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return set(out.stdout.split())


def test_search_core_imports_no_ml_framework():
    loaded = _loaded_after(
        "import thinktree.search, thinktree.search.mcts, thinktree.search.gumbel, thinktree.search.baselines, "
        "thinktree.search.store"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_rewards_import_no_training_stack():
    loaded = _loaded_after("import thinktree.rewards, thinktree.rewards.labels")
    assert not loaded & {"trl", "accelerate", "deepspeed", "peft"}


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed")
def test_import_linter_contracts_hold():
    proc = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed")
def test_import_linter_catches_a_forbidden_import(tmp_path):
    """A contract that cannot fail proves nothing: plant a forbidden import in a copy and watch it break."""
    copy = tmp_path / "proj"
    shutil.copytree(
        ROOT, copy, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "*.egg-info")
    )
    bad = copy / "rewards" / "tasks" / "arith.py"
    bad.write_text("import thinktree.trainer.config  # noqa\n" + bad.read_text())
    # point the namespace at the copy so grimp analyses the planted import
    env_path = tmp_path / "ns" / "thinktree"
    env_path.mkdir(parents=True)
    for name in ("search", "rewards", "trainer"):
        (env_path / name).symlink_to(copy / name)
    proc = subprocess.run(
        [LINT, "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=300,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tmp_path / "ns")},
    )  # fmt: skip
    assert proc.returncode != 0
    assert "rewards imports nothing from search or trainer BROKEN" in proc.stdout
