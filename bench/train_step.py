"""Tokens per second of one tree-GRPO optimiser step, packed and unpacked, vs TRL's ``GRPOTrainer``, on search trees.

Trees. A quickstart-like round in miniature (``recipes/quickstart.yaml``'s model size, task and MCTS settings): a
``tiny:llama`` (h=128, 4 layers) is warm-started by SFT on arith's worked solutions (``--warm-steps``, lr 2e-3,
batch 32), then MCTS (12 simulations, 3 children, rollout evaluation, steps split at newlines) searches
``--trees`` train prompts and TreeRL compiles the trees into path records (``tree_advantages(method="treerl")``).
The timed step takes the records of whole trees, in search order, up to ``--batch`` records (one optimiser step,
one micro-batch); ``prefix_sharing`` is the share of those records' tokens that packing does not recompute. A
chunk drawn like ``GRPO.plan`` draws it (a seeded permutation of all records) is printed beside it for comparison:
today's step plan mixes trees, which lowers sharing; the timed step groups whole trees. ``--synthetic`` replaces
the search by random unbranched chains (the previous version of this bench; no sharing).

Three steps on the same records, same tiny model (same seed and sizes), same loss settings (``dapo``,
``beta``/``kl_coef`` 0, clip 0.2, one iteration, AdamW, ``max_grad_norm`` 1, entropy computed, no gradient
checkpointing — TRL's default of ``gradient_checkpointing=True`` is turned off for parity), in one process:

* ``unpacked``: thinktree's ``GRPO.step`` with each path its own right-padded row;
* ``packed``: the same with ``train.pack_tokens`` (``--pack-tokens``): each shared prefix computed once per step
  (:mod:`thinktree.trainer.algos.packing`; its gradient equals the unpacked one, ``tests/test_packing.py``);
* ``trl``: TRL's ``GRPOTrainer`` fed the same batch (per-token ``[B, T]`` advantages) by a subclass whose
  ``_prepare_inputs`` returns the fixed tensors (no generation, no reward scoring), stepped with
  ``trainer.training_step`` + ``clip_grad_norm_`` + ``optimizer.step``.

Only the optimisation is timed: forward, loss, backward, clipping, optimiser step (the packed step includes building
its layout). Repeats alternate between the three; the median is reported. Tokens = the records' real prompt +
completion tokens (padding not counted), the same number for all three, so a packed step is credited with the
tokens it trains, not the fewer it computes.

Run: ``.venv/bin/python bench/train_step.py [--trees 12] [--batch 32] [--warm-steps 200] [--pack-tokens 4096]
[--repeats 7] [--synthetic]``. Prints a table and, as its last line, one JSON object with ``packed_tok_s``,
``thinktree_tok_s`` (unpacked), ``trl_tok_s``, ``packed_vs_unpacked``, ``packed_vs_trl``, ``ratio`` (unpacked /
TRL) and ``prefix_sharing``.
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

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from thinktree.trainer.algos.batching import PromptIds, step_plan  # noqa: E402
from thinktree.trainer.algos.engine import Engine  # noqa: E402
from thinktree.trainer.algos.grpo import GRPO  # noqa: E402
from thinktree.trainer.algos.packing import pack_paths, prefix_sharing  # noqa: E402
from thinktree.trainer.config import TrainConfig, load_config  # noqa: E402
from thinktree.trainer.models import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def search_records(args: argparse.Namespace, out_dir: str) -> tuple[list[dict], list[int], dict]:
    """Path records of MCTS trees from a warm-started quickstart-sized model (see module doc), tree by tree."""
    from datasets import Dataset

    from thinktree.rewards import get_task
    from thinktree.trainer.algos.sft import SFTSettings, train_sft
    from thinktree.trainer.searching import make_outcome_fn, make_prompts, make_proposer, run_method
    from thinktree.trainer.signals import tree_advantages

    recipe = load_config(ROOT / "recipes" / "quickstart.yaml")
    model, tok = load_policy("tiny:llama", seed=0, tiny_sizes=_sizes(args))
    task = get_task(recipe.task.name, **recipe.task.kwargs)
    rows = task.load("train", n=max(args.trees, 1024), seed=0)
    prompts = make_prompts(task, rows)
    start = time.perf_counter()
    if args.warm_steps > 0:
        data = Dataset.from_list(
            [{"prompt": p.prompt, "completion": s} for p, s in zip(prompts, rows["solution"])]
        )
        settings = SFTSettings(steps=args.warm_steps, learning_rate=2e-3, per_device_batch_size=32, seed=0)
        train_sft(model, tok, data, settings, out_dir)
    warm_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        results = run_method("mcts", prompts[: args.trees], make_proposer(model, tok, recipe.search),
                             make_outcome_fn(task), recipe.search, np.random.default_rng(0),
                             answer_fn=task.extract_answer)  # fmt: skip
    search_s = time.perf_counter() - start
    records, tree_of = [], []
    for i, res in enumerate(results):
        recs = tree_advantages(res.tree, method=recipe.train.advantage)
        records.extend(recs)
        tree_of.extend([i] * len(recs))
    info = {"trees": len(results), "records": len(records), "warm_s": round(warm_s, 1),
            "search_s": round(search_s, 1),
            "search_accuracy": round(float(np.mean([(r.reward or 0.0) >= 0.5 for r in results])), 3)}  # fmt: skip
    return records, tree_of, info


def thinktree_step(records: list[dict], args: argparse.Namespace, pack_tokens: int = 0):
    model, tok = load_policy("tiny:llama", seed=0, tiny_sizes=_sizes(args))
    cfg = TrainConfig(per_device_batch_size=len(records), grad_accum=1, loss_type="dapo", kl_coef=0.0,
                      clip_coef=0.2, learning_rate=1e-5, max_grad_norm=1.0, log_entropy=True,
                      pack_tokens=pack_tokens)  # fmt: skip
    algo = GRPO(Engine(model, tok, cfg))
    rows = list(range(len(records)))
    step = lambda: algo.step(records, rows, {}, first=False)  # noqa: E731
    if pack_tokens:
        step()  # decides tree-attention support (a probe) outside the timing
        if getattr(algo, "_pack_problem", None) is not None:
            raise SystemExit(f"packing unavailable: {algo._pack_problem}")
    return step


def sharing_of(records: list[dict], rows: list[int], prompts: PromptIds, budget: int) -> float:
    seqs = [prompts(records[r]["prompt"]) + list(records[r]["completion_ids"]) for r in rows]
    return prefix_sharing(pack_paths(seqs, budget))


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
    ap.add_argument("--trees", type=int, default=12, help="prompts searched (one tree each)")
    ap.add_argument(
        "--batch", type=int, default=32, help="records per step (quickstart per_device_batch_size)"
    )
    ap.add_argument("--warm-steps", type=int, default=200, help="SFT warm-start steps before the search")
    ap.add_argument("--pack-tokens", type=int, default=4096)
    ap.add_argument("--synthetic", action="store_true", help="random unbranched chains instead of a search")
    ap.add_argument("--completion-len", type=int, default=96, help="--synthetic: longest completion")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    prompts = PromptIds(load_policy("tiny:llama")[1])
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            records, info = make_records(args.batch, args.completion_len), {"source": "synthetic chains"}
            plan_sharing = 0.0
        else:
            every, tree_of, info = search_records(args, tmp)
            records = every[: args.batch]
            # the sharing of a step drawn like GRPO.plan draws it (a seeded permutation of all the records)
            chunk = step_plan(len(every), min(args.batch, len(every)), 1, seed=0)[0]
            plan_sharing = sharing_of(every, chunk, prompts, args.pack_tokens)
            info.update(source="mcts", timed_trees=len(set(tree_of[: args.batch])))
        rows = list(range(len(records)))
        tokens = sum(len(prompts(r["prompt"])) + len(r["completion_ids"]) for r in records)
        sharing = sharing_of(records, rows, prompts, args.pack_tokens)
        steps = {"packed": thinktree_step(records, args, args.pack_tokens), "unpacked": thinktree_step(records, args),
                 "trl": trl_step(records, args, tmp)}  # fmt: skip
        for fn in steps.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for k, fn in steps.items():
                times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: tokens / v for k, v in med.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"records: {json.dumps(info)}")
    print(f"one GRPO optimiser step: {len(records)} records, {tokens} tokens, prefix sharing {sharing:.3f} "
          f"(a GRPO.plan-drawn chunk of the same records: {plan_sharing:.3f}), tiny:llama h={args.hidden} "
          f"L={args.layers}, {device}, median of {args.repeats}")  # fmt: skip
    print(f"{'impl':<10} {'median s':>10} {'min s':>10} {'tok/s':>10}")
    for k in steps:
        print(f"{k:<10} {med[k]:>10.4f} {min(times[k]):>10.4f} {tok_s[k]:>10.1f}")
    print(f"packed / unpacked {tok_s['packed'] / tok_s['unpacked']:.2f}x, packed / TRL "
          f"{tok_s['packed'] / tok_s['trl']:.2f}x")  # fmt: skip
    result = {"packed_tok_s": round(tok_s["packed"], 1), "thinktree_tok_s": round(tok_s["unpacked"], 1),
              "trl_tok_s": round(tok_s["trl"], 1),
              "packed_vs_unpacked": round(tok_s["packed"] / tok_s["unpacked"], 3),
              "packed_vs_trl": round(tok_s["packed"] / tok_s["trl"], 3),
              "ratio": round(tok_s["unpacked"] / tok_s["trl"], 3), "prefix_sharing": round(sharing, 3),
              "plan_chunk_prefix_sharing": round(plan_sharing, 3), "tokens_per_step": tokens,
              "batch": len(records), "pack_tokens": args.pack_tokens, "repeats": args.repeats, "device": device,
              **info}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
