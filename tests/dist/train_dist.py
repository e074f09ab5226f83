"""A few tree-GRPO steps on a tiny model, run by ``tests/test_distributed.py`` under ``accelerate launch`` on CPU.

Asserts the launch really started ``--world`` processes, trains 3 optimiser steps (per-device batch 1, accumulation 2)
where step 1 has a NaN loss on its second micro-batch (the window must be discarded on every rank), and writes
``rank<r>.json`` (a sha256 of the rank's full weights, gathered under ZeRO-3, plus the metrics) and, on rank 0,
``weights.pt``; then every rank saves a checkpoint to ``ckpt/`` (ZeRO-3: the model directory is gathered).
``run(...)`` is also imported by the test to train the single-process reference in-process.

    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate/cpu_ddp_2.yaml \\
        tests/dist/train_dist.py --out /tmp/x --world 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import torch

from thinktree.trainer.algos.batching import step_plan
from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.checkpoint import save_checkpoint
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy

N_RECORDS, GRAD_ACCUM, STEPS, SEED = 12, 2, 3, 0
POISON_STEP, POISON_POS = 1, 2  # chunk position 2 = rank 0's second micro-batch when world = 2


def make_records(n: int = N_RECORDS, seed: int = 0) -> list[dict]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        k = g.randint(3, 8)
        ids = [g.randint(4, 60) for _ in range(k)]
        adv = [g.uniform(-1, 1)] * k
        out.append({"prompt": f"Q{i}: {i}+{i}=", "completion_ids": ids, "advantages": adv,
                    "old_logprobs": [-4.5] * k, "loss_mask": [1] * k, "prefix_len": 0})  # fmt: skip
    return out


class PoisonGRPO(GRPO):
    """GRPO whose loss is NaN on the micro-batch holding record ``poison`` (a loss that goes bad mid-window)."""

    poison = -1

    def loss(self, out, batch, norm, first):
        loss, parts = super().loss(out, batch, norm, first)
        if self.poison in batch.rows:
            loss = loss * float("nan")
        return loss, parts


def config(per_device_batch_size: int, grad_accum: int) -> TrainConfig:
    return TrainConfig(
        learning_rate=1e-2, per_device_batch_size=per_device_batch_size, grad_accum=grad_accum, steps=STEPS,
        loss_type="dapo", max_grad_norm=1.0, log_entropy=False,
    )  # fmt: skip


def run(per_device_batch_size: int, grad_accum: int = GRAD_ACCUM) -> tuple[Engine, list[dict]]:
    model, tok = load_policy("tiny:llama", seed=SEED)
    engine = Engine(model, tok, config(per_device_batch_size, grad_accum))
    records = make_records()
    algo = PoisonGRPO(engine, seed=SEED)
    algo.poison = step_plan(len(records), 4, 1, SEED)[POISON_STEP][POISON_POS]
    return engine, algo.train(records, progress=False)


def weights_of(engine: Engine) -> dict[str, torch.Tensor]:
    with engine.unwrap_for_generation() as policy:
        return {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    engine, history = run(per_device_batch_size=4 // (args.world * GRAD_ACCUM))
    acc = engine.accelerator
    assert acc.num_processes == args.world, f"launched {acc.num_processes} processes, expected {args.world}"
    weights = weights_of(engine)
    digest = hashlib.sha256()
    for k in sorted(weights):
        digest.update(k.encode())
        digest.update(weights[k].float().numpy().tobytes())
    out = Path(args.out)
    info = {"rank": acc.process_index, "world": acc.num_processes, "distributed_type": str(acc.distributed_type),
            "sha256": digest.hexdigest(), "history": history}  # fmt: skip
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(info))
    if acc.is_main_process:
        torch.save(weights, out / "weights.pt")
    save_checkpoint(engine, out / "ckpt", STEPS, data_state={"step": STEPS}, tokenizer=engine.tokenizer)


if __name__ == "__main__":
    main()
