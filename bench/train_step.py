"""Tokens per second of one tree-GRPO optimiser step vs TRL's ``GRPOTrainer`` doing the same work.

Both sides get the same tiny model (``tiny:llama``, same seed and sizes), the same batch of prompts and completions
(per-token advantages; TRL's ``_compute_loss`` accepts ``[B, T]`` advantages), the same loss settings (``dapo``
normalisation, ``beta``/``kl_coef`` 0, clip 0.2, one iteration, AdamW, ``max_grad_norm`` 1, entropy computed, no
gradient checkpointing — TRL's default of ``gradient_checkpointing=True`` is turned off for parity) and run in the same
process. Only the optimisation is timed: forward, loss, backward, clipping, optimiser step. TRL is fed its batch by a
subclass whose ``_prepare_inputs`` returns the fixed tensors (no generation, no reward scoring) and stepped with
``trainer.training_step`` + ``clip_grad_norm_`` + ``optimizer.step``; thinktree with ``GRPO.step`` (which also does
the NaN guards and metric reduction). Repeats alternate between the two; the median is reported. Tokens = real prompt
+ completion tokens of the batch (padding not counted), the same number for both.

Run: ``.venv/bin/python bench/train_step.py [--batch 8] [--completion-len 96] [--hidden 256] [--layers 4]
[--repeats 7]``. Prints a table and, as its last line, one JSON object with ``thinktree_tok_s``, ``trl_tok_s`` and
``ratio`` (thinktree / TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from thinktree.trainer.algos.batching import PromptIds  # noqa: E402
from thinktree.trainer.algos.engine import Engine  # noqa: E402
from thinktree.trainer.algos.grpo import GRPO  # noqa: E402
from thinktree.trainer.config import TrainConfig  # noqa: E402
from thinktree.trainer.models import load_policy  # noqa: E402


def make_records(n: int, completion_len: int, seed: int = 0) -> list[dict]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        k = g.randint(completion_len // 2, completion_len)
        question = f"Q{i}: what is {g.randint(10, 999)} + {g.randint(10, 999)}? Think step by step.\n"
        out.append({"prompt": question, "completion_ids": [g.randint(4, 90) for _ in range(k)],
                    "advantages": [g.uniform(-1, 1) for _ in range(k)], "old_logprobs": [-4.5] * k,
                    "loss_mask": [1] * k, "prefix_len": 0})  # fmt: skip
    return out


def thinktree_step(records: list[dict], args: argparse.Namespace):
    model, tok = load_policy("tiny:llama", seed=0, tiny_sizes=_sizes(args))
    cfg = TrainConfig(per_device_batch_size=len(records), grad_accum=1, loss_type="dapo", kl_coef=0.0,
                      clip_coef=0.2, learning_rate=1e-5, max_grad_norm=1.0, log_entropy=True)  # fmt: skip
    algo = GRPO(Engine(model, tok, cfg))
    rows = list(range(len(records)))
    return lambda: algo.step(records, rows, {}, first=False)


def trl_inputs(records: list[dict], tok) -> dict[str, torch.Tensor]:
    prompts = PromptIds(tok)
    p_ids = [prompts(r["prompt"]) for r in records]
    c_ids = [r["completion_ids"] for r in records]
    P, C, B = max(map(len, p_ids)), max(map(len, c_ids)), len(records)
    pad = tok.pad_token_id
    inputs = {k: torch.zeros((B, n), dtype=torch.long) for k, n in
              (("prompt_ids", P), ("prompt_mask", P), ("completion_ids", C), ("completion_mask", C))}  # fmt: skip
    inputs["prompt_ids"].fill_(pad)
    inputs["completion_ids"].fill_(pad)
    adv, old = torch.zeros((B, C)), torch.zeros((B, C))
    for b, (p, c, r) in enumerate(zip(p_ids, c_ids, records)):
        inputs["prompt_ids"][b, P - len(p) :] = torch.tensor(p)  # TRL left-pads prompts
        inputs["prompt_mask"][b, P - len(p) :] = 1
        inputs["completion_ids"][b, : len(c)] = torch.tensor(c)
        inputs["completion_mask"][b, : len(c)] = 1
        adv[b, : len(c)] = torch.tensor(r["advantages"])
        old[b, : len(c)] = torch.tensor(r["old_logprobs"])
    inputs["advantages"], inputs["old_per_token_logps"] = adv, old  # the rollout logprobs, as thinktree uses
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    return inputs


def trl_step(records: list[dict], args: argparse.Namespace, out_dir: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = load_policy("tiny:llama", seed=0, tiny_sizes=_sizes(args))
    batch = trl_inputs(records, tok)

    class FixedBatchGRPO(GRPOTrainer):
        def _prepare_inputs(self, generation_batch):  # no generation, no scoring: the fixed batch
            return batch

    cfg = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=len(records), num_generations=len(records),
        max_completion_length=max(len(r["completion_ids"]) for r in records), loss_type="dapo", beta=0.0,
        epsilon=0.2, learning_rate=1e-5, max_grad_norm=1.0, gradient_checkpointing=False, use_cpu=True,
        bf16=False, fp16=False, report_to="none", logging_steps=10**9, save_strategy="no",
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in records])
    trainer = FixedBatchGRPO(
        model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=cfg,
        train_dataset=data, processing_class=tok,
    )  # fmt: skip
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1

    def step() -> None:
        trainer.training_step(trainer.model, batch, num_items_in_batch=None)
        trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), cfg.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def _sizes(args: argparse.Namespace) -> dict:
    return {"hidden_size": args.hidden, "num_hidden_layers": args.layers}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    records = make_records(args.batch, args.completion_len)
    tok = load_policy("tiny:llama")[1]
    prompts = PromptIds(tok)
    tokens = sum(len(prompts(r["prompt"])) + len(r["completion_ids"]) for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = thinktree_step(records, args), trl_step(records, args, tmp)
        ours(), theirs()  # warm-up
        times: dict[str, list[float]] = {"thinktree": [], "trl": []}
        for _ in range(args.repeats):
            times["thinktree"].append(timed(ours))
            times["trl"].append(timed(theirs))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: tokens / v for k, v in med.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"one GRPO optimiser step: batch {args.batch}, {tokens} tokens, tiny:llama h={args.hidden} "
          f"L={args.layers}, {device}, median of {args.repeats}")  # fmt: skip
    print(f"{'impl':<10} {'median s':>10} {'min s':>10} {'tok/s':>10}")
    for k in ("thinktree", "trl"):
        print(f"{k:<10} {med[k]:>10.4f} {min(times[k]):>10.4f} {tok_s[k]:>10.1f}")
    result = {"thinktree_tok_s": round(tok_s["thinktree"], 1), "trl_tok_s": round(tok_s["trl"], 1),
              "ratio": round(tok_s["thinktree"] / tok_s["trl"], 3), "tokens_per_step": tokens,
              "batch": args.batch, "repeats": args.repeats, "device": device}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
