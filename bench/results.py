"""Reproducible results page: every number in ``docs/RESULTS.md`` (and ``docs/img/*.png``) comes from one run of this.

    .venv/bin/python bench/results.py            # full mode → docs/RESULTS.md, docs/img/*.png (24 min measured, 2 cores)
    .venv/bin/python bench/results.py --quick    # CI-sized → runs/results-quick/RESULTS.md (3 min measured, 2 cores)
    .venv/bin/python bench/results.py --out DIR  # write the page (and img/) to DIR instead
    .venv/bin/python bench/results.py --render-only  # redraw the page from the last run's results.json

Experiments (sizes per mode in ``results_common.SIZES``; fixed seeds):

1. learning curves of a tiny Llama on ``arith`` — tree-GRPO vs token-matched i.i.d. GRPO vs MCTS step-DPO from
   one shared SFT warm start per seed, plus a parameter-matched tiny Mamba (``results_learning``);
2. SmolLM2-135M-Instruct + LoRA, one tree-GRPO round on CPU (``results_parts.smollm_lora``);
3. test-time compute: ``thinktree ablate`` on the warm-start checkpoint, and ``bench/prm_rerank.py``;
4. throughput: ``bench/search_throughput.py`` and ``bench/train_step.py``, run back to back at the end, alone;
5. GSM8K / MATH-500: graders' self-score on all references, SmolLM2 greedy on fixed test slices.

Experiments run as child processes in two or three lanes at once (one torch thread each); intermediate outputs live in
``runs/results/<mode>/`` and every finished part is kept as JSON there, so a rerun resumes (delete the folder for a
fresh run; the page marks reused parts). GPU figures come from ``docs/gpu_results.json`` when it exists
(``bench/gpu_check.sh`` writes it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import results_learning as learning
import results_parts as parts
from results_common import ROOT, SIZES, cached_part
from results_page import write_page


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, torch/transformers versions, load average, date (UTC)."""
    import torch
    import transformers

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor() or "unknown",
    )
    mem = next(
        (ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")),
        "0",
    )
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }  # fmt: skip


def lane_a(work: Path, sizes: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Learning curves per seed (Llama), then the test-time grid on seed 0's warm start, then the PRM bench on the
    same checkpoint and the test-time cells that use its PRM."""
    out: dict[str, Any] = {}
    lw = work / "learning"
    lw.mkdir(parents=True, exist_ok=True)
    for seed in sizes["seeds"][:1]:
        out[f"learning_seed{seed}"] = cached_part(
            lw, f"seed{seed}", lambda s=seed: learning.run_seed(lw, sizes, s)
        )
    ckpt = str(lw / f"seed{sizes['seeds'][0]}" / "warm_start" / "warm_start" / "checkpoint")
    out["ablate"] = cached_part(work, "ablate", lambda: parts.test_time(work, sizes, ckpt))
    if sizes["prm"]:
        out["prm"] = cached_part(work, "prm", lambda: parts.prm_rerank(work, quick, ckpt))
        if "error" not in out["prm"]:
            prm = out["prm"]["checkpoint"]
            out["ablate_prm"] = cached_part(
                work, "ablate_prm", lambda: parts.test_time(work, sizes, ckpt, prm)
            )
    if quick:  # balances the lanes: the quick learning lane is short, the SmolLM one is not
        out["real_data"] = cached_part(work, "real_data", lambda: parts.real_data(work, sizes))
    return out


def lane_b(work: Path, sizes: dict[str, Any], quick: bool) -> dict[str, Any]:
    """SmolLM2 + LoRA, GSM8K / MATH-500 sanity."""
    return {
        "smollm": cached_part(work, "smollm", lambda: parts.smollm_lora(work, sizes)),
        **(
            {}
            if quick
            else {"real_data": cached_part(work, "real_data", lambda: parts.real_data(work, sizes))}
        ),
    }


def lane_c(work: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    """Learning curves of the other seeds (each its own warm start), then the tiny Mamba (seed 0)."""
    lw = work / "learning"
    lw.mkdir(parents=True, exist_ok=True)
    out = {
        f"learning_seed{s}": cached_part(lw, f"seed{s}", lambda s=s: learning.run_seed(lw, sizes, s))
        for s in sizes["seeds"][1:]
    }
    seed = sizes["seeds"][0]
    out["mamba"] = cached_part(lw, f"mamba_seed{seed}", lambda: learning.run_mamba(lw, sizes, seed))
    return out


def run_all(work: Path, mode: str) -> dict[str, Any]:
    sizes, quick = SIZES[mode], mode == "quick"
    with ThreadPoolExecutor(max_workers=3) as pool:
        lanes = [pool.submit(lane_a, work, sizes, quick), pool.submit(lane_b, work, sizes, quick)]
        lanes.append(pool.submit(lane_c, work, sizes))
        results = {k: v for lane in lanes for k, v in lane.result().items()}
    # alone on our side of the box (the other lane is finished), so the ratios are not skewed by our own load
    results["throughput"] = cached_part(work, "throughput", lambda: parts.throughput(work, quick))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized experiments (≤ 15 min on 2 cores)")
    ap.add_argument(
        "--out", default=None, help="page directory (default: docs/ for full, runs/results-quick)"
    )
    ap.add_argument("--work", default=None, help="intermediate runs (default: runs/results/<mode>)")
    ap.add_argument("--gpu-json", default=str(ROOT / "docs" / "gpu_results.json"), help="GPU figures, if any")
    ap.add_argument(
        "--render-only", action="store_true",
        help="rewrite the page and plots from the work folder's results.json (the last run's numbers and machine "
        "info, unchanged) without running anything",
    )  # fmt: skip
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    out = Path(args.out or (ROOT / ("runs/results-quick" if args.quick else "docs")))
    work = Path(args.work or (ROOT / "runs" / "results" / mode)).absolute()
    work.mkdir(parents=True, exist_ok=True)
    (out / "img").mkdir(parents=True, exist_ok=True)
    if args.render_only:
        saved = json.loads((work / "results.json").read_text())
        page = write_page(out, saved["machine"], saved["results"], SIZES[mode], Path(args.gpu_json))
        print(f"rendered {page} from {work / 'results.json'} (run of {saved['machine']['date']})")
        return 0
    info = machine()
    info["argv"] = sys.argv[1:]
    start = time.perf_counter()
    results = run_all(work, mode)
    info["wall_s"] = time.perf_counter() - start
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["mode"], info["work"] = mode, str(work)
    (work / "results.json").write_text(
        json.dumps({"machine": info, "results": results}, indent=1, default=str)
    )
    page = write_page(out, info, results, SIZES[mode], Path(args.gpu_json))
    print(f"wrote {page} ({info['wall_s'] / 60:.1f} min, mode {mode})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
