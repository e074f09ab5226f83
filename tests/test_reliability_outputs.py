"""Issue 14, defects 7 and 8: leftovers of a killed save are cleaned up (an interrupted replacement restored);
non-finite weights fail loudly naming the parameters; JSON never holds NaN or Infinity."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from thinktree.trainer.models import (
    NonFiniteWeightsError,
    check_finite_weights,
    load_policy,
    remove_partials,
    save_policy,
)
from thinktree.trainer.outputs import dumps_finite, finite_json, write_json_atomic


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------- defect 7: partials


def test_save_removes_leftovers_of_a_killed_save(tmp_path: Path) -> None:
    model, tok = load_policy("tiny:llama")
    out = tmp_path / "round-01" / "checkpoint"
    dead = _dead_pid()
    stale = [
        tmp_path / "round-01" / f".checkpoint.partial-{dead}-abc123",
        tmp_path / "round-01" / ".checkpoint.partial-legacy1",  # before pid tagging: always stale
        tmp_path / "round-01" / f".checkpoint.old-{dead}-0f0f0f0f",
    ]
    live = tmp_path / "round-01" / f".checkpoint.partial-{os.getppid()}-inprogress"  # a living process's save
    other = tmp_path / "round-01" / f".other.partial-{dead}-x"  # another target's: not this save's business
    for d in [*stale, live, other]:
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    save_policy(model, tok, out)
    save_policy(model, tok, out)  # a replacement: its own .old copy goes too
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == sorted(["checkpoint", live.name, other.name])
    assert load_policy(out)[0].config.hidden_size == model.config.hidden_size


def test_interrupted_replacement_is_restored(tmp_path: Path) -> None:
    """Killed between the two renames: the target is missing and its complete old copy is beside it."""
    model, tok = load_policy("tiny:llama")
    out = save_policy(model, tok, tmp_path / "warm_start" / "checkpoint")
    old = out.parent / f".checkpoint.old-{_dead_pid()}-deadbeef"
    os.rename(out, old)
    loaded, _ = load_policy(out)  # a resume loading the checkpoint finds it back in place
    assert out.is_dir() and not old.exists()
    want = dict(model.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in loaded.named_parameters())


def test_remove_partials_walks_a_run_directory(tmp_path: Path) -> None:
    dead = _dead_pid()
    a = tmp_path / "round-02" / f".checkpoint.partial-{dead}-x"
    b = tmp_path / "prm" / ".model.partial-legacy"
    keep = tmp_path / "round-02" / f".checkpoint.partial-{os.getppid()}-live"
    old = tmp_path / "round-01" / f".checkpoint.old-{dead}-y"
    for d in (a, b, keep, old):
        d.mkdir(parents=True)
    removed = remove_partials(tmp_path)
    assert sorted(removed) == sorted([a, b])
    assert keep.exists() and not old.exists() and (tmp_path / "round-01" / "checkpoint").is_dir()
    assert remove_partials(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------ defect 8: non-finite values


def test_check_finite_weights_names_the_parameters() -> None:
    model, _ = load_policy("tiny:llama")
    check_finite_weights(model, "round 1 training")  # a fresh model is finite
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        dict(model.named_parameters())[names[3]][0, 0] = float("nan")
        dict(model.named_parameters())[names[5]].view(-1)[-1] = float("inf")
    with pytest.raises(NonFiniteWeightsError) as err:
        check_finite_weights(model, "round 1 training")
    msg = str(err.value)
    assert msg.startswith(f"round 1 training: the weights are not finite (NaN or inf) in 2 of {len(names)}")
    assert names[3] in msg and names[5] in msg and names[4] not in msg
    assert isinstance(err.value, ValueError)  # a user error for the CLI: one line, exit 2


def test_json_never_holds_nan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = {
        "rounds": [{"loss": float("nan"), "acc": 0.5}, {"loss": np.float32("inf"), "acc": np.float64(0.25)}],
        "kl": -math.inf,
        "steps": 3,
        "ok": True,
        "name": "x",
    }
    clean, bad = finite_json(data)
    assert bad == ["rounds[0].loss", "rounds[1].loss", "kl"]
    assert clean == {"rounds": [{"loss": None, "acc": 0.5}, {"loss": None, "acc": 0.25}], "kl": None,
                     "steps": 3, "ok": True, "name": "x"}  # fmt: skip
    path = tmp_path / "summary.json"
    with caplog.at_level("WARNING"):
        write_json_atomic(path, data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == clean
    assert "rounds[0].loss" in caplog.text and str(path) in caplog.text
    assert dumps_finite([1.0, float("nan")]) == "[1.0, null]"
