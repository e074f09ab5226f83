"""Tree-GRPO on a tiny model with a checkpoint after every optimiser step; run (and SIGKILLed) by tests/test_resume.py.

Each run resumes from the newest checkpoint in ``--ckpt`` and, once the plan is done, writes the final weights to
``--out``. ``--lora`` trains a LoRA adapter with dropout 0.1 (so the restored torch RNG state matters); otherwise full
fine-tuning with ``kl_coef > 0`` (a frozen reference copy whose logprobs are kept in the checkpoints).

    python tests/dist/train_resume.py --ckpt /tmp/c --out /tmp/final.pt [--lora]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from accelerate.utils import set_seed

from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy

STEPS = 8  # 8 records, global batch 4, 4 iterations


def make_records(n: int = 8, seed: int = 0) -> list[dict]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        k = g.randint(3, 8)
        out.append({"prompt": f"Q{i}: {i}-1=", "completion_ids": [g.randint(4, 60) for _ in range(k)],
                    "advantages": [g.uniform(-1, 1) for _ in range(k)], "old_logprobs": [-4.5] * k,
                    "loss_mask": [1] * k, "prefix_len": 0})  # fmt: skip
    return out


def run(ckpt: str | Path, lora: bool) -> dict[str, torch.Tensor]:
    set_seed(0)
    spec = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1} if lora else None
    model, tok = load_policy("tiny:llama", seed=0, lora=spec)
    cfg = TrainConfig(
        per_device_batch_size=2, grad_accum=2, steps=0, num_iterations=4, learning_rate=1e-2, save_steps=1,
        save_total_limit=2, kl_coef=0.0 if lora else 0.05, lr_scheduler_type="cosine", warmup_steps=2,
    )  # fmt: skip
    engine = Engine(model, tok, cfg, num_training_steps=STEPS)
    GRPO(engine, seed=0).train(make_records(), checkpoint_dir=ckpt, progress=False)
    return {k: v.detach().clone() for k, v in engine.wrapper.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="store_true")
    args = ap.parse_args()
    torch.save(run(args.ckpt, args.lora), args.out)


if __name__ == "__main__":
    main()
