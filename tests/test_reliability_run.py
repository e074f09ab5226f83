"""Issue 14, defects 2, 5, 6, 8, 9, 10 in ``thinktree train``'s run loop: every user error is one line and exit 2
before anything is written to the output dir, and the corrected command then runs in the same dir; checkpoint
paths in ``stages.json`` are relative (a moved or copied run dir resumes from its own files); a training stage
resumed after its last step or mid-stage keeps all its metrics; non-finite weights fail the run loudly;
``rounds.prompts_per_round`` past the train split is logged. The SIGKILL test is ``tests/test_reliability_kill.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_pipeline import TINY as PIPELINE_TINY

from thinktree.trainer import round_training, rounds
from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.cli import main
from thinktree.trainer.config import TrainConfig, load_config
from thinktree.trainer.distributed import Topology
from thinktree.trainer.models import load_policy
from thinktree.trainer.rounds import Stages, relative_checkpoint, run_train

FAST = [
    *PIPELINE_TINY,
    "task.eval_size=2",
    "search.num_simulations=2",
    "search.max_depth=2",
    "search.max_step_tokens=6",
    "search.max_batch_size=2",
    "rounds.num_rounds=0",
    "eval.methods=[greedy]",
    "eval.health=false",
]
ROUND = ["rounds.num_rounds=1", "rounds.prompts_per_round=2", "train.algo=grpo", "train.steps=2",
         "train.per_device_batch_size=4", "train.save_steps=1"]  # fmt: skip


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("thinktree train: ") and "Traceback" not in err, err
    return lines[0]


def _gsm_rows(n: int, long_row: int | None = None, long_answer: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        q, steps = f"Q{i}: what is {i} + 1?", f"{i} + 1 = {i + 1}"
        if i == long_row:
            if long_answer:
                steps = " ".join([steps] * 150)  # ~1500 characters: past the tiny model's 1024 positions
            else:
                q = q + " and then" * 200
        rows.append({"question": q, "answer": f"{steps}\n#### {i + 1}"})
    return rows


def _write_data(data: Path, train: list[dict] | str, test: list[dict]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    text = train if isinstance(train, str) else "".join(json.dumps(r) + "\n" for r in train)
    (data / "train.jsonl").write_text(text)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))


def _gsm(data: Path) -> list[str]:
    return ["task.name=gsm8k", f"task.kwargs={{path: {data}}}", "task.train_size=6"]


# (bad setup, extra overrides, what the one line says, the fix, overrides of the corrected command)
CASES = {
    "eval_prompt_too_long": (
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2, long_row=1)),
        [],
        [
            "task gsm8k test split",
            "test row",
            "Q1: what is 1 + 1?",
            "do not fit the model context (1024 positions",
        ],
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        None,
    ),
    "train_prompt_too_long": (
        lambda d: _write_data(d, _gsm_rows(6, long_row=4), _gsm_rows(2)),
        ROUND,
        ["task gsm8k train split", "train row", "Q4: what is 4 + 1?", "do not fit the model context"],
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        None,
    ),
    "warm_start_solution_too_long": (
        lambda d: _write_data(d, _gsm_rows(6, long_row=2, long_answer=True), _gsm_rows(2)),
        [
            "rounds.warm_start.algo=sft",
            "rounds.warm_start.steps=1",
            "rounds.warm_start.per_device_batch_size=2",
        ],
        ["task gsm8k warm start (prompt + worked solution)", "train row", "Q2: what is 2 + 1?"],
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        None,
    ),
    "malformed_train_file": (
        lambda d: _write_data(d, json.dumps(_gsm_rows(1)[0]) + '\n{"question": \n', _gsm_rows(2)),
        ROUND,
        ["train.jsonl", "line 2", "invalid JSON"],
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        None,
    ),
    "process_check_without_step_check": (
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        ["search.process_check=true"],
        ["search.process_check", "'gsm8k' cannot check steps"],
        lambda d: None,
        [],
    ),
    "missing_model": (
        lambda d: _write_data(d, _gsm_rows(6), _gsm_rows(2)),
        ["model.policy={data}/no-such-model"],
        ["no-such-model"],
        lambda d: None,
        ["model.policy=tiny:llama"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_writes_nothing_and_the_corrected_command_runs_in_the_same_dir(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup, extra, says, fix, fixed_extra = CASES[case]
    data, out = tmp_path / "data", tmp_path / "run"
    setup(data)
    extra = [x.replace("{data}", str(data)) for x in extra]
    args = ["train", *FAST, *_gsm(data), *extra, f"output.dir={out}"]
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err)
    for part in says:
        assert part in line, line
    assert (
        not out.exists()
    )  # not even config.yaml, which would refuse the corrected run as a different recipe
    fix(data)
    corrected = (
        args if fixed_extra is None else ["train", *FAST, *_gsm(data), *fixed_extra, f"output.dir={out}"]
    )
    assert main(corrected) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"][-1]["round"] == (1 if "rounds.num_rounds=1" in corrected else 0)


def test_stages_store_checkpoints_relative_and_read_old_absolute_ones(tmp_path: Path) -> None:
    assert relative_checkpoint("/old/place/run/round-02/checkpoint") == "round-02/checkpoint"
    assert relative_checkpoint("/old/place/run/warm_start/checkpoint") == "warm_start/checkpoint"
    assert relative_checkpoint("/models/my-policy") == "/models/my-policy"  # not a stage's: kept
    assert relative_checkpoint("round-01/checkpoint") == "round-01/checkpoint"
    old = {"warm_start": {"checkpoint": "/elsewhere/run/warm_start/checkpoint"}, "round-0/eval": {"round": 0},
           "round-1/train": {"checkpoint": "/elsewhere/run/round-01/checkpoint", "loss": 1.0}}  # fmt: skip
    (tmp_path / "stages.json").write_text(json.dumps(old))
    stages = Stages(tmp_path, Topology(rank=0, world=1))
    assert stages.get("round-1/train")["checkpoint"] == "round-01/checkpoint"
    assert stages.last_checkpoint() == str(tmp_path / "round-01" / "checkpoint")
    assert stages.resolve("/abs/model") == "/abs/model"


def _poison(model) -> None:
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")


def _poisoned(stage):
    """A round trainer ``(run, trees, rdir)`` that leaves a NaN in the policy after training."""

    def wrapped(run, *args, **kwargs):
        result = stage(run, *args, **kwargs)
        _poison(run.model)
        return result

    return wrapped


def test_resumed_training_stage_keeps_its_metrics_and_a_moved_or_copied_run_uses_its_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One GRPO round killed after its last training step, before the stage was recorded: the resumed stage
    reports the round's metrics (defect 6). Then the run dir, moved, resumes with nothing to redo, and a copy
    whose stages.json holds the old absolute paths loads its own weights (defect 5)."""
    out = tmp_path / "run"
    cfg = load_config(
        None, [*FAST, *ROUND, "task.train_size=3", "rounds.prompts_per_round=4", f"output.dir={out}"]
    )
    real_train = rounds.train_stage

    def dies_after_training(run, rdir):
        real_train(run, rdir)
        raise KeyboardInterrupt("killed after the last training step")

    monkeypatch.setattr(rounds, "train_stage", dies_after_training)
    with caplog.at_level(logging.INFO, logger="thinktree"), pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    assert "rounds.prompts_per_round=4 is more than the 3 train prompts" in caplog.text  # defect 10
    steps = (out / "round-01" / "train_metrics.jsonl").read_text()
    assert len(steps.splitlines()) == 2
    monkeypatch.setattr(rounds, "train_stage", real_train)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thinktree"):
        summary = run_train(cfg)
    assert "no training signal" not in caplog.text
    assert (out / "round-01" / "train_metrics.jsonl").read_text() == steps  # not rewritten empty
    last = json.loads(steps.splitlines()[-1])
    row = summary["rounds"][1]
    assert row["optimizer_steps"] == 2 and row["loss"] == pytest.approx(last["train/loss"])
    assert row["checkpoint"] == "round-01/checkpoint"
    stages = json.loads((out / "stages.json").read_text())
    assert stages["round-1/train"]["checkpoint"] == "round-01/checkpoint"

    # moved: resumes with nothing to redo (every stage would raise), a killed save's leftover removed
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    (moved / "round-01" / ".checkpoint.partial-999999999-x").mkdir()

    def redo(*args, **kwargs):
        raise AssertionError("a finished stage was redone")

    for name in ("search_stage", "train_stage", "warm_start", "evaluate_policy"):
        monkeypatch.setattr(rounds, name, redo)
    again = run_train(load_config(None, [*FAST, *ROUND, "task.train_size=3", "rounds.prompts_per_round=4",
                                         f"output.dir={moved}"]))  # fmt: skip
    assert json.loads((moved / "stages.json").read_text()) == stages
    assert again["rounds"] == summary["rounds"]
    assert not (moved / "round-01" / ".checkpoint.partial-999999999-x").exists()

    # copied, with stages.json as written before paths were relative (absolute, naming the original)
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    old = {k: ({**v, "checkpoint": str(moved / v["checkpoint"])} if isinstance(v, dict) and "checkpoint" in v
               else v) for k, v in stages.items()}  # fmt: skip
    (copy / "stages.json").write_text(json.dumps(old))
    shutil.rmtree(moved)
    loaded = []
    real_load = rounds.load_policy
    monkeypatch.setattr(
        rounds, "load_policy", lambda spec, **kw: (loaded.append(spec), real_load(spec, **kw))[1]
    )
    run_train(load_config(None, [*FAST, *ROUND, "task.train_size=3", "rounds.prompts_per_round=4",
                                 f"output.dir={copy}"]))  # fmt: skip
    assert loaded == [str(copy / "round-01" / "checkpoint")]


def _records(n: int = 8) -> list[dict]:
    import random

    g = random.Random(0)
    out = []
    for i in range(n):
        k = g.randint(3, 8)
        out.append({"prompt": f"Q{i}: {i}-1=", "completion_ids": [g.randint(4, 60) for _ in range(k)],
                    "advantages": [g.uniform(-1, 1) for _ in range(k)], "old_logprobs": [-4.5] * k,
                    "loss_mask": [1] * k})  # fmt: skip
    return out


def _grpo(ckpt: Path, stop_after: int | None = None) -> list[dict]:
    model, tok = load_policy("tiny:llama", seed=0)
    cfg = TrainConfig(per_device_batch_size=2, grad_accum=1, steps=4, learning_rate=1e-2, save_steps=1)
    engine = Engine(model, tok, cfg, num_training_steps=4)
    if stop_after is not None:

        def stop(e, metrics):
            if e.optimizer_steps > stop_after:
                raise KeyboardInterrupt("killed")  # before this step's checkpoint: stop_after steps are saved

        engine.on_step_end.append(stop)
    return GRPO(engine, seed=0).train(_records(), checkpoint_dir=ckpt, progress=False)


def test_grpo_history_survives_a_resume(tmp_path: Path) -> None:
    whole = _grpo(tmp_path / "whole")
    assert [m["train/plan_step"] for m in whole] == [1.0, 2.0, 3.0, 4.0]
    assert (
        _grpo(tmp_path / "whole") == whole
    )  # resumed after its last step: the full history, nothing trained
    with pytest.raises(KeyboardInterrupt):
        _grpo(tmp_path / "killed", stop_after=2)
    resumed = _grpo(tmp_path / "killed")  # mid-stage: steps 1-2 from the checkpoint, 3-4 trained now
    assert [m["train/plan_step"] for m in resumed] == [1.0, 2.0, 3.0, 4.0]
    for a, b in zip(resumed, whole):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("where", ["warm_start", "round"])
def test_non_finite_weights_fail_loudly_and_keep_nothing(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    if where == "warm_start":
        monkeypatch.setattr(
            round_training, "train_sft", lambda model, *a, **k: (_poison(model), {"train_loss": 1.0})[1]
        )
        extra = ["rounds.warm_start.algo=sft", "rounds.warm_start.steps=1"]
    else:
        monkeypatch.setitem(rounds.ROUND_TRAINERS, "grpo", _poisoned(rounds.ROUND_TRAINERS["grpo"]))
        extra = [*ROUND, "rounds.prompts_per_round=1"]
    assert main(["train", *FAST, *extra, f"output.dir={out}"]) == 2
    err = capsys.readouterr().err  # training's progress bars, then the one line
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("thinktree train: ") and "the stage is not recorded" in line
    stage = "after the warm start" if where == "warm_start" else "after round 1's training"
    assert f"{stage}: the weights are not finite" in line and "model.embed_tokens.weight" in line
    stages = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    assert "warm_start" not in stages and "round-1/train" not in stages
    assert not (out / "warm_start" / "checkpoint").exists() and not (out / "round-01" / "checkpoint").exists()
    assert not (out / "summary.json").exists()


def test_prompts_per_round_past_the_split_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, [*FAST, "rounds.num_rounds=2", "rounds.prompts_per_round=10",
                             "rounds.warm_start.algo=sft", "rounds.warm_start.examples=4"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="thinktree"):
        rounds._note_round_size(cfg, list(range(12)))
    assert (
        "rounds.prompts_per_round=10 is more than the 8 train prompts past the warm start's 4" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="thinktree"):
        rounds._note_round_size(cfg, list(range(14)))
    assert caplog.text == ""
