"""Checkpoints: loadable model directories, atomic saves, and SIGKILL-then-resume == an uninterrupted run.

The kill tests run ``tests/dist/train_resume.py`` as a subprocess (checkpoint after every step), SIGKILL it at chosen
moments (after N checkpoints, while a checkpoint is being written, at a random time), resume with the same command and
compare the final weights with an uninterrupted run of the same code in this process.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "train_resume.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("train_resume", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def _launch(ckpt: Path, out: Path, lora: bool) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--ckpt", str(ckpt), "--out", str(out), *(["--lora"] if lora else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise TimeoutError("the training script never reached the kill point")


def _finish(ckpt: Path, out: Path, lora: bool) -> dict[str, torch.Tensor]:
    proc = _launch(ckpt, out, lora)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    return torch.load(out)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def _n_ckpts(ckpt: Path, n: int):
    return lambda: len(list_checkpoints(ckpt)) >= 1 and int(latest_checkpoint(ckpt).name.split("-")[1]) >= n


def test_resume_after_sigkill_lora(tmp_path):
    reference = _script_module().run(tmp_path / "ref", lora=True)
    ckpt, out = tmp_path / "run", tmp_path / "final.pt"
    assert _kill_when(_launch(ckpt, out, True), _n_ckpts(ckpt, 3))
    assert not out.exists() and len(list_checkpoints(ckpt)) >= 1
    _assert_same(reference, _finish(ckpt, out, True))


@pytest.mark.slow
def test_resume_after_several_sigkills_full_finetune(tmp_path):
    reference = _script_module().run(tmp_path / "ref", lora=False)
    ckpt, out = tmp_path / "run", tmp_path / "final.pt"
    rng = random.Random(1234)
    partial = lambda: any(p.name.endswith(".partial") for p in ckpt.glob(".checkpoint-*"))  # noqa: E731
    kill_points = [_n_ckpts(ckpt, 1), partial]
    for ready in kill_points:
        assert _kill_when(_launch(ckpt, out, False), ready)
    for _ in range(2):  # random moments after start-up (the run takes ~10-20 s here)
        proc = _launch(ckpt, out, False)
        delay = rng.uniform(8.0, 16.0)
        start = time.monotonic()
        _kill_when(proc, lambda s=start, d=delay: time.monotonic() - s > d)
    _assert_same(reference, _finish(ckpt, out, False))


def _engine(lora: bool) -> tuple[Engine, object]:
    model, tok = load_policy("tiny:llama", seed=0, lora={"r": 4, "lora_alpha": 8} if lora else None)
    cfg = TrainConfig(per_device_batch_size=2, grad_accum=1, steps=1, learning_rate=1e-2)
    return Engine(model, tok, cfg), tok


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_model_dir_loads_with_plain_transformers_and_peft(tmp_path, lora):
    from transformers import AutoModelForCausalLM

    engine, tok = _engine(lora)
    records = _script_module().make_records(4)
    GRPO(engine).step(records, [0, 1], {}, first=True)
    path = save_checkpoint(engine, tmp_path, 1, data_state={"step": 1}, tokenizer=tok)
    assert (
        path.name == "checkpoint-00000001"
        and (path / "state").is_dir()
        and (path / "trainer_state.json").is_file()
    )
    trained = {k: v.detach() for k, v in engine.policy.state_dict().items()}
    if lora:
        from peft import PeftModel

        base = load_policy("tiny:llama", seed=0)[0]
        loaded = PeftModel.from_pretrained(base, str(path / "model"))
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path / "model"))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, trained[k], atol=0, rtol=0, msg=k)
    # Load into a fresh engine: weights, optimiser state and counters come back.
    fresh, _ = _engine(lora)
    assert load_checkpoint(fresh, path) == {"step": 1}
    assert fresh.optimizer_steps == 1
    for k, v in fresh.wrapper.state_dict().items():
        torch.testing.assert_close(v, engine.wrapper.state_dict()[k], atol=0, rtol=0)
    assert (
        fresh.raw_optimizer.state_dict()["state"].keys() == engine.raw_optimizer.state_dict()["state"].keys()
    )


def test_checkpoint_rotation_and_leftovers(tmp_path):
    engine, tok = _engine(False)
    (tmp_path / ".checkpoint-00000009.partial").mkdir()  # a killed save's leftover
    for step in (1, 2, 3):
        save_checkpoint(engine, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert latest_checkpoint(tmp_path / "missing") is None
