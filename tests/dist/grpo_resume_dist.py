"""One tree-GRPO stage (6 optimiser steps, a checkpoint after each) under ``accelerate launch``; run, SIGKILLed
mid-stage and relaunched by ``tests/test_reliability_kill.py`` (DeepSpeed ZeRO-2, 2 CPU processes).

Each launch resumes from the newest checkpoint in ``--ckpt`` (``accelerator.load_state``: DeepSpeed's per-rank
optimiser shards) and, at the end, writes ``rank<r>.json``: a sha256 of the rank's full weights and the stage's
metric history (those before the kill included).

    accelerate launch --config_file tests/dist/zero2_cpu.yaml tests/dist/grpo_resume_dist.py --ckpt C --out O
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from train_dist import make_records, weights_of

from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy

STEPS = 6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_policy("tiny:llama", seed=0)
    cfg = TrainConfig(
        learning_rate=1e-2, per_device_batch_size=1, grad_accum=2, steps=STEPS, loss_type="dapo", max_grad_norm=1.0,
        save_steps=1, save_total_limit=2, lr_scheduler_type="cosine", warmup_steps=1,
    )  # fmt: skip
    engine = Engine(model, tok, cfg, num_training_steps=STEPS)
    history = GRPO(engine, seed=0).train(make_records(), checkpoint_dir=args.ckpt, progress=False)
    weights = weights_of(engine)
    digest = hashlib.sha256()
    for k in sorted(weights):
        digest.update(k.encode())
        digest.update(weights[k].float().numpy().tobytes())
    acc = engine.accelerator
    info = {"world": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "sha256": digest.hexdigest(), "history": history}  # fmt: skip
    (Path(args.out) / f"rank{acc.process_index}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
