"""Issue 14: ``thinktree train`` SIGKILLed at 20+ points and resumed with the same command each time ends with the
summary of an uninterrupted run (every non-timing field, training metrics included); no partial folders remain;
the run dir, moved elsewhere, resumes with nothing to redo.

The recipe: ``tests/test_learning.py``'s TINY from its shared SFT warm start (trees with correct and wrong leaves), plus an
engine warm start of 6 steps and 2 tree-GRPO rounds of 3 steps, with a training checkpoint after every step. Kill points
are chosen by polling the run dir: a training checkpoint appearing or being written, a policy save in progress,
a tree store growing, a stage recorded, an eval file written, or a moment after one of those (mid-search,
mid-evaluation). Every restart is a new process, so model loading and engine rebuilding are exercised each time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_learning import warm  # noqa: F401  (the module-scoped warm-start fixture)

KILL_RECIPE = [
    "rounds.warm_start.algo=engine",
    "rounds.warm_start.steps=6",
    "rounds.warm_start.examples=24",
    "rounds.warm_start.learning_rate=1e-3",
    "rounds.warm_start.per_device_batch_size=4",
    "train.save_steps=1",
    "train.save_total_limit=2",
    "search.max_batch_size=2",
    "train.algo=grpo",
]


def _stage(name: str) -> Callable[[Path], bool]:
    def holds(run: Path) -> bool:
        try:
            return name in json.loads((run / "stages.json").read_text())
        except (OSError, ValueError):
            return False

    return holds


def _appears(pattern: str) -> Callable[[Path], bool]:
    return lambda run: next(run.glob(pattern), None) is not None


def _trees(n: int, rdir: str) -> Callable[[Path], bool]:
    def holds(run: Path) -> bool:
        try:
            return len((run / rdir / "trees.jsonl").read_text().splitlines()) >= n
        except OSError:
            return False

    return holds


def _kill_points() -> list[tuple[str, Callable[[Path], bool], float]]:
    """(what, condition on the run dir, seconds to wait once it holds): in the order a run meets them."""
    points = [
        ("warm start: training step 2 checkpointed", _appears("warm_start/trainer/checkpoint-00000002"), 0.0),
        ("warm start: a training checkpoint being written", _appears("warm_start/trainer/.checkpoint-*.partial"),
         0.0),
        ("warm start: step 5 checkpointed", _appears("warm_start/trainer/checkpoint-00000005"), 0.0),
        ("warm start: policy save in progress", _appears("warm_start/.checkpoint.partial-*"), 0.0),
        ("round 0: mid-evaluation", _stage("warm_start"), 0.1),
        ("round 0: eval.json written, stage not yet", _appears("round-00/eval.json"), 0.0),
    ]  # fmt: skip
    for r in (1, 2):
        d = f"round-{r:02d}"
        points += [
            (f"round {r}: mid-search (first trees stored)", _trees(1, d), 0.0),
            (f"round {r}: mid-search (more trees)", _trees(3, d), 0.0),
            (f"round {r}: search recorded", _stage(f"round-{r}/search"), 0.0),
            (f"round {r}: signals written", _appears(f"{d}/signals.jsonl"), 0.0),
            (f"round {r}: a training checkpoint being written", _appears(f"{d}/trainer/.checkpoint-*.partial"), 0.0),
            (f"round {r}: training step 1 checkpointed", _appears(f"{d}/trainer/checkpoint-00000001"), 0.0),
            (f"round {r}: training step 2 checkpointed", _appears(f"{d}/trainer/checkpoint-00000002"), 0.0),
            (f"round {r}: training done, policy not saved", _appears(f"{d}/train_metrics.jsonl"), 0.0),
            (f"round {r}: policy save in progress", _appears(f"{d}/.checkpoint.partial-*"), 0.0),
            (f"round {r}: mid-evaluation", _stage(f"round-{r}/train"), 0.1),
            (f"round {r}: eval.json written, stage not yet", _appears(f"{d}/eval.json"), 0.0),
        ]  # fmt: skip
    return points


def _command(overrides: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "thinktree.trainer.cli", "train", *overrides, f"output.dir={out}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_with_kills(cmd: list[str], run: Path, deadline: float) -> tuple[list[str], int]:
    """Run ``cmd`` to completion, SIGKILLing it at each kill point that is still ahead; returns the points it
    was killed at and the number of launches."""
    killed, launches, points = [], 0, _kill_points()
    while True:
        launches += 1
        # a condition that already holds was passed by an earlier launch
        ahead = [p for p in points if not p[1](run)] if run.exists() else list(points)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        hit = None
        try:
            while proc.poll() is None and time.time() < deadline:
                hit = next((p for p in ahead if p[1](run)), None)
                if hit is not None:
                    time.sleep(hit[2])
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode == -signal.SIGKILL:
            killed.append(hit[0])
            points = [p for p in points if p is not hit]
            continue
        assert proc.returncode == 0, err.decode()[-3000:]
        return killed, launches


def _without_timing(data):
    if isinstance(data, dict):
        return {k: _without_timing(v) for k, v in data.items()
                if not (k.endswith("_s") or "time" in k) and k != "recipe"}  # fmt: skip
    if isinstance(data, list):
        return [_without_timing(v) for v in data]
    return data


def _assert_same(a, b, where: str = "summary") -> None:
    """Equal, floats up to rounding (rel 1e-4, abs 1e-6: a resumed step may differ from the uninterrupted one in
    the last float bits: ~1e-8 in the weights, ~2e-8 in ``logprob_mismatch``, itself ~2e-7); all else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), (where, a, b)
    else:
        assert a == b, (where, a, b)


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.is_dir() and (".partial" in p.name or ".old-" in p.name
                                                          or p.name.startswith(".deleting-"))]  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_20_points_resumes_to_the_uninterrupted_summary(warm, tmp_path):  # noqa: F811
    overrides = [*warm, *KILL_RECIPE]
    ref = subprocess.run(_command(overrides, tmp_path / "ref"), env=_env(), capture_output=True, timeout=900)
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert expected["rounds"][1]["optimizer_steps"] == 9 and expected["rounds"][2]["optimizer_steps"] == 12

    run, start = tmp_path / "run", time.time()
    killed, launches = _run_with_kills(_command(overrides, run), run, deadline=start + 2400)
    elapsed = time.time() - start
    print(f"\n{len(killed)} kills over {launches} launches in {elapsed:.0f} s:\n  " + "\n  ".join(killed))
    assert len(killed) >= 20, killed
    assert {k.split(":")[0] for k in killed} >= {"warm start", "round 0", "round 1", "round 2"}
    got = json.loads((run / "summary.json").read_text())
    _assert_same(_without_timing(got), _without_timing(expected))
    for r in (1, 2):  # every optimiser step's metrics, those before each kill included
        a = (run / f"round-0{r}" / "train_metrics.jsonl").read_text().splitlines()
        b = (tmp_path / "ref" / f"round-0{r}" / "train_metrics.jsonl").read_text().splitlines()
        assert len(a) == len(b) == 3
        _assert_same([json.loads(x) for x in a], [json.loads(x) for x in b], f"round {r} steps")
    assert _leftovers(run) == []

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(run, moved)
    before = {p: p.stat().st_mtime_ns for p in moved.rglob("*") if p.is_file()}
    again = subprocess.run(_command(overrides, moved), env=_env(), capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    changed = {p.name for p in moved.rglob("*") if p.is_file() and before.get(p) != p.stat().st_mtime_ns}
    assert changed <= {"summary.json", "accuracy.png"}, changed  # nothing redone: only the report rewritten
    _assert_same(_without_timing(json.loads((moved / "summary.json").read_text())), _without_timing(got))


DS_SCRIPT = Path(__file__).resolve().parent / "dist" / "grpo_resume_dist.py"


def _ds_launch(ckpt: Path, out: Path) -> subprocess.Popen:
    from launching import free_port

    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(DS_SCRIPT.parent / "zero2_cpu.yaml"),
           "--main_process_port", str(free_port()), str(DS_SCRIPT), "--ckpt", str(ckpt), "--out", str(out)]  # fmt: skip
    env = {**_env(), "DS_BUILD_OPS": "0"}
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _ds_finish(ckpt: Path, out: Path) -> list[dict]:
    proc = _ds_launch(ckpt, out)
    log, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, log.decode()[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_deepspeed_zero2_grpo_stage_killed_mid_stage_resumes_to_the_same_weights(tmp_path):
    """2 processes, ZeRO-2: SIGKILL the launcher and both ranks once step 3's checkpoint exists, relaunch; the
    final weights hash and the stage's metric history equal an uninterrupted 2-process run's."""
    whole = _ds_finish(tmp_path / "whole_ckpt", tmp_path / "whole")
    assert all("DEEPSPEED" in r["distributed_type"] and r["world"] == 2 for r in whole)
    ckpt = tmp_path / "killed_ckpt"
    proc = _ds_launch(ckpt, tmp_path / "killed")
    try:
        deadline = time.time() + 1200
        while proc.poll() is None and time.time() < deadline and not (ckpt / "checkpoint-00000003").exists():
            time.sleep(0.01)
        assert proc.poll() is None, "the stage ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (tmp_path / "killed" / "rank0.json").exists()
    resumed = _ds_finish(ckpt, tmp_path / "killed")
    assert resumed[0]["sha256"] == resumed[1]["sha256"] == whole[0]["sha256"]
    assert [m["train/plan_step"] for m in resumed[0]["history"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert resumed[0]["history"] == whole[0]["history"]
