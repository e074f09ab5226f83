"""Shared helpers of ``bench/results.py``: running a command with its log, caching a part's JSON, mode sizes."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
THINKTREE = [PY, "-m", "thinktree.trainer.cli"]

SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": [0], "rounds": 1, "prompts_per_round": 16, "eval_size": 32, "ws_steps": 150,
        "smol_train": 3, "smol_eval": 6, "smol_rounds": 1, "smol_steps": 2, "gsm8k_n": 2, "math_n": 1,
        "ablate_eval": 24, "lr_sweep": [], "prm": True, "mamba_max_step_s": 0.0, "mamba_probe_timeout": 400,
    },
    "full": {
        "seeds": [0, 1], "rounds": 3, "prompts_per_round": 64, "eval_size": 256, "ws_steps": 600,
        "smol_train": 16, "smol_eval": 32, "smol_rounds": 1, "smol_steps": 8, "gsm8k_n": 16, "math_n": 10,
        "ablate_eval": 64, "lr_sweep": [1.0e-4, 2.0e-4], "prm": True, "mamba_max_step_s": 2.0, "mamba_probe_timeout": 600,
    },
}  # fmt: skip
"""Experiment sizes per mode (seeds, rounds, prompts, eval sizes) — the page prints the ones it used."""


def child_env() -> dict[str, str]:
    """Environment of every child process: one torch thread each (steadier on a shared box), quiet progress bars."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(HF_DATASETS_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1", TRL_EXPERIMENTAL_SILENCE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_logged(cmd: list[str], log: Path, timeout: float = 3600) -> float:
    """Run ``cmd`` in the repo root with its output appended to ``log``; raise on failure; return wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        )
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - start


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (the bench scripts' result line)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON line in the output")


def run_json(cmd: list[str], log: Path, timeout: float = 3600) -> tuple[dict[str, Any], float]:
    """Run a bench script; return its last JSON line and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}")
    return last_json_line(proc.stdout), time.perf_counter() - start


def cached_part(work: Path, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work/<name>.json`` if a finished earlier run left it, else ``fn()`` (timed) written there."""
    path = work / f"{name}.json"
    if path.exists():
        data = json.loads(path.read_text())
        data["reused"] = True
        mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        data.setdefault("finished_utc", mtime.strftime("%Y-%m-%d %H:%M UTC"))
        return data
    start = time.perf_counter()
    try:
        data = fn()
    except Exception as e:  # a failed part is reported on the page, not fatal to the others
        data = {"error": f"{type(e).__name__}: {e}"}
    data["part_wall_s"] = time.perf_counter() - start
    data["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if "error" not in data:
        path.write_text(json.dumps(data, indent=1))
    return data


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
