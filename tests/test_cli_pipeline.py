"""End to end on a tiny model: ``thinktree search`` (trees + summary, resume) and ``thinktree train`` (warm start,
one self-evolution round, evaluation, summary/plot/TensorBoard, stage resume)."""

from __future__ import annotations

import json

import pytest

from thinktree.search.store import TreeStore
from thinktree.trainer.cli import main
from thinktree.trainer.config import ConfigError, load_config
from thinktree.trainer.rounds import run_train

TINY = [
    "model.policy=tiny:llama",
    "task.name=arith",
    "task.kwargs={ops: [2, 2], digits: 1}",
    "task.train_size=64",
    "task.eval_size=4",
    "search.num_simulations=3",
    "search.num_children=2",
    "search.in_flight=2",
    "search.max_depth=3",
    "search.max_step_tokens=8",
    "output.report_to=[]",
]


def test_search_command_writes_trees_and_resumes(tmp_path, capsys):
    args = ["search", *TINY, f"output.dir={tmp_path}", "search.max_batch_size=2"]
    assert main(args + ["--limit", "3"]) == 0
    store = TreeStore(tmp_path / "search" / "test" / "trees.jsonl")
    assert len(store) == 3
    summary = json.loads((tmp_path / "search" / "test" / "summary.json").read_text())
    assert summary["num_prompts"] == 3 and summary["generated_tokens"] > 0
    assert 0.0 <= summary["accuracy"] <= 1.0
    first = (tmp_path / "search" / "test" / "trees.jsonl").read_bytes()
    # a larger run over the same output resumes: the first three trees are kept byte for byte
    assert main(args + ["--limit", "4"]) == 0
    assert "resuming: 3 of 4" in capsys.readouterr().out
    assert (tmp_path / "search" / "test" / "trees.jsonl").read_bytes().startswith(first)
    assert len(TreeStore(tmp_path / "search" / "test" / "trees.jsonl")) == 4


def test_train_pipeline_runs_rounds_and_resumes(tmp_path):
    overrides = TINY + [
        f"output.dir={tmp_path}",
        "output.report_to=[tensorboard]",
        "rounds.num_rounds=1",
        "rounds.prompts_per_round=4",
        "rounds.warm_start.algo=sft",
        "rounds.warm_start.steps=3",
        "rounds.warm_start.per_device_batch_size=8",
        "train.algo=sft",
        "train.steps=2",
        "train.per_device_batch_size=4",
        "eval.methods=[greedy, mcts]",
        "eval.retained_task=countdown",
        "eval.retained_size=2",
    ]
    cfg = load_config(None, overrides)
    summary = run_train(cfg)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for row in summary["rounds"]:
        assert set(row["eval"]) == {"greedy", "mcts"}
        assert all(0.0 <= m["accuracy"] <= 1.0 and m["generated_tokens"] > 0 for m in row["eval"].values())
    assert summary["rounds"][1]["trees"] == 4 and summary["rounds"][1]["generated_tokens"] > 0
    # health metrics from real evaluation passes: KL is 0 at round 0 (the reference is the round-0 policy)
    row0, row1 = summary["rounds"]
    for key in ("health/bits_per_char_ref", "health/general_nll_bits_per_char", "health/retained_accuracy",
                "health/kl_from_round0", "health/entropy"):  # fmt: skip
        assert key in row0 and key in row1, key
    assert abs(row0["health/kl_from_round0"]) < 1e-6
    assert "health/retained_accuracy_delta_pts" in row1
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert list((tmp_path / "tensorboard").glob("events.*"))
    assert (tmp_path / "warm_start" / "checkpoint" / "config.json").exists()
    assert (tmp_path / "round-01" / "trees.jsonl").exists()
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert {"warm_start", "round-0/eval", "round-1/search", "round-1/train", "round-1/eval"} <= set(stages)

    # Resume after the search stage: drop the later stages and rerun — the stored trees are reused, not redone.
    trees_before = (tmp_path / "round-01" / "trees.jsonl").read_bytes()
    for key in ("round-1/train", "round-1/eval"):
        stages.pop(key)
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    again = run_train(cfg)
    assert (tmp_path / "round-01" / "trees.jsonl").read_bytes() == trees_before
    assert [r["round"] for r in again["rounds"]] == [0, 1]


def test_train_refuses_unavailable_algorithms(tmp_path):
    cfg = load_config(None, TINY + [f"output.dir={tmp_path}", "rounds.num_rounds=1", "train.algo=bogus"])
    with pytest.raises(ConfigError, match="not a round algorithm"):
        run_train(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_eval_command_methods_and_errors(tmp_path, capsys):
    out = tmp_path / "ev.json"
    args = ["eval", *TINY, f"output.dir={tmp_path}", "search.num_samples=2", "--out", str(out)]
    assert main(args + ["--methods", "greedy,self_consistency,step_beam,mcts"]) == 0
    record = json.loads(out.read_text())
    assert set(record["methods"]) == {"greedy", "self_consistency", "step_beam", "mcts"}
    for m in record["methods"].values():
        assert 0.0 <= m["accuracy"] <= m["pass_at_k"] <= 1.0  # the chosen answer is one of the tree's leaves
        assert m["num_prompts"] == 4
    assert main(args + ["--methods", "bogus"]) == 2
    assert "unknown method" in capsys.readouterr().err
    # a checkpoint of another architecture is refused before anything is written
    from thinktree.trainer.models import load_policy, save_policy

    model, tok = load_policy("tiny:qwen2")
    save_policy(model, tok, tmp_path / "qwen")
    out.unlink()
    assert main(args + ["--checkpoint", str(tmp_path / "qwen")]) == 2
    assert "does not match the recipe's model" in capsys.readouterr().err
    assert not out.exists()


def test_train_killed_mid_round_resumes_to_completion(tmp_path):
    """SIGKILL the CLI once it is inside round 1 (search done, training not), rerun the same command: it picks up
    at the first unfinished stage, keeps the stored trees, and finishes every round."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = TINY + [
        f"output.dir={tmp_path}", "rounds.num_rounds=2", "rounds.prompts_per_round=3",
        "rounds.warm_start.algo=sft", "rounds.warm_start.steps=2", "rounds.warm_start.per_device_batch_size=8",
        "train.algo=grpo", "train.per_device_batch_size=4", "eval.methods=[greedy]", "eval.health=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "thinktree.trainer.cli", "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages_file, deadline = tmp_path / "stages.json", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if stages_file.exists() and "round-1/search" in stages_file.read_text():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-round"
    killed_stages = json.loads(stages_file.read_text())
    assert "round-2/eval" not in killed_stages
    trees = (tmp_path / "round-01" / "trees.jsonl").read_bytes()

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert (tmp_path / "round-01" / "trees.jsonl").read_bytes() == trees  # the search was not redone
    assert (tmp_path / "round-02" / "checkpoint" / "config.json").exists()


@pytest.mark.parametrize(
    "launch_config, use_cpu",
    [
        ("recipes/accelerate/cpu_ddp_2.yaml", True),
        pytest.param("tests/dist/zero3_cpu.yaml", False, marks=pytest.mark.slow, id="zero3"),
    ],
    ids=["ddp", "zero3"],
)
def test_two_process_round_shards_search_and_trains(tmp_path, launch_config, use_cpu):
    """``accelerate launch`` with 2 processes on the CPU (DDP; DeepSpeed ZeRO-3, whose partitioned weights are
    gathered for each round's search): each rank searches its shard (one tree store per rank, so the world size
    really is 2), GRPO trains on all ranks' trees for 2 rounds, rank 0 writes the summary."""
    import os
    import shutil
    import sys
    from pathlib import Path

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    root = Path(__file__).resolve().parents[1]
    cmd = [
        launcher, "launch", "--config_file", str(root / launch_config),
        "-m", "thinktree.trainer.cli", "train", *TINY, f"output.dir={tmp_path}", "rounds.num_rounds=2",
        "rounds.prompts_per_round=4", "train.algo=grpo", "train.per_device_batch_size=2", "train.grad_accum=2",
        "eval.methods=[greedy]", "eval.health=false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "true"} if use_cpu else {})}
    from launching import run_launch

    done = run_launch(lambda: cmd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "round-01").glob("trees*.jsonl"))
    assert shards == ["trees.rank0.jsonl", "trees.rank1.jsonl"]
    assert sum(len(TreeStore(tmp_path / "round-01" / s)) for s in shards) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert summary["rounds"][1]["trees"] == 4 and summary["rounds"][1]["advantage_records"] > 0
    assert summary["rounds"][1]["eval"]["greedy"]["num_prompts"] == 4  # merged over both ranks' shards
