"""Search throughput: thinktree's batched, prefix-cached MCTS vs plain ``generate`` vs a sequential no-cache search.

Measured on the same model, hardware and thread count, in one run:

(a) ``generate``   — ``model.generate(do_sample=True)`` at the same batch width as (b), ``max_new_tokens`` = one
                     step, repeated until it has sampled as many tokens as (b) did (the throughput ceiling of
                     plain sampling, with no tree bookkeeping and no step boundaries).
(b) ``search``     — :func:`thinktree.search.mcts.search` over all prompts at once with :class:`HFStepProposer`
                     (``max_batch_size`` = batch width, prefix cache on): each wave's leaves x children are one
                     batched ``propose`` call that resumes every prefix from its cached K/V.
(c) ``sequential`` — the anchors' design: the same MCTS, one prompt and one leaf at a time (``in_flight=1``),
                     ``max_batch_size=1`` and ``cache=False``, so every proposal re-encodes its whole prefix.
(d) ``propose``    — the backend alone at full width (``width / children`` prompts re-expanded), to separate the
                     backend's speed from how wide the search's calls are (MCTS rollout calls are narrower).

Throughput is generated tokens (steps returned to the search, rollouts included) per wall-clock second of the
whole call (the ``cpu_*`` fields use process CPU time instead: steadier on a shared box, same with 1 thread). The last printed line is one JSON object: search_tok_s, generate_tok_s, sequential_tok_s,
ratio_vs_generate (b/a), speedup_vs_sequential (b/c), reencoded_per_generated (prefix tokens (b) fed again per
generated token) and the settings. A random tiny model rarely samples the delimiter, so most steps run to
``--step-tokens``; rollouts run to ``--max-depth`` steps.

Run: ``.venv/bin/python bench/search_throughput.py`` (tiny Llama, about a minute on 2 CPU cores), or
``--model tiny:qwen2|tiny:mamba|<dir>|<hub id> --dtype bfloat16 --device cuda``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import numpy as np
import torch

from thinktree.search import Trajectory
from thinktree.search.backends.hf import HFStepProposer
from thinktree.search.mcts import MCTSConfig, search

PROMPTS = [
    ("Q: 17 + 25 = ?\nA:", "42"),
    ("Q: 9 * 8 = ?\nA:", "72"),
    ("Q: 100 - 37 = ?\nA:", "63"),
    ("Q: 144 / 12 = ?\nA:", "12"),
    ("Q: 3 + 4 * 5 = ?\nA:", "23"),
    ("Q: 2 ** 10 = ?\nA:", "1024"),
    ("Q: 81 - 19 + 6 = ?\nA:", "68"),
    ("Q: 7 * 13 = ?\nA:", "91"),
]
TINY_SIZES = {"hidden_size": 128, "num_hidden_layers": 4}


def load(spec: str, dtype: str, device: str) -> tuple[Any, Any]:
    """``tiny:<arch>`` (random, 128 wide x 4 layers) or anything ``trainer.models.load_policy`` accepts."""
    try:
        from thinktree.trainer.models import load_policy
    except ImportError:
        load_policy = None
    if load_policy is not None:
        model, tok = load_policy(spec, dtype=dtype, device=device, tiny_sizes=TINY_SIZES)
    elif spec.startswith("tiny:"):
        from thinktree.trainer.tiny import build_tiny_model

        model, tok = build_tiny_model(spec.split(":", 1)[1], **TINY_SIZES)
        model = model.to(device=device, dtype=getattr(torch, dtype))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=getattr(torch, dtype)).to(device)
    return model.eval(), tok


def outcome(trajs) -> list[float]:
    return [1.0 if t.meta["answer"] in t.completion else 0.0 for t in trajs]


def prompts(n: int) -> list[Trajectory]:
    return [Trajectory(q, key=k, meta={"answer": a}) for k, (q, a) in enumerate((PROMPTS * n)[:n])]


def run_search(model, tok, args, sequential: bool) -> dict[str, Any]:
    proposer = HFStepProposer(
        model, tok, step_delimiter="\n", max_step_tokens=args.step_tokens,
        max_batch_size=1 if sequential else args.width, cache=not sequential,
    )  # fmt: skip
    cfg = MCTSConfig(
        num_simulations=args.simulations, num_children=args.children, in_flight=1 if sequential else args.in_flight,
        max_depth=args.max_depth, evaluation="rollout",
    )  # fmt: skip
    batch = prompts(args.sequential_prompts if sequential else args.prompts)
    start, cpu = time.perf_counter(), time.process_time()
    if sequential:
        for p in batch:
            search([p], proposer, outcome, config=cfg, rng=np.random.default_rng(p.key))
    else:
        search(batch, proposer, outcome, config=cfg, rng=np.random.default_rng(0))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stats = dict(proposer.stats)
    return {"tokens": stats["generated_tokens"], "seconds": seconds, "cpu": cpu, "stats": stats}


def run_generate(model, tok, args, target_tokens: int) -> dict[str, Any]:
    """Sample with ``generate`` at batch width ``args.width`` until ``target_tokens`` tokens were produced."""
    texts = [q for q, _ in (PROMPTS * args.width)[: args.width]]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, calls, start, cpu = 0, 0, time.perf_counter(), time.process_time()
    with torch.inference_mode():
        while tokens < target_tokens:
            out = model.generate(
                **enc, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=args.step_tokens,
                pad_token_id=pad,
            )  # fmt: skip
            new = out[:, enc["input_ids"].shape[1] :]
            tokens += int((new != pad).sum())
            calls += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens": tokens, "seconds": seconds, "cpu": cpu, "calls": calls}


def run_propose(model, tok, args, target_tokens: int) -> dict[str, Any]:
    """(d) The backend alone at full width: ``width / children`` prompts x ``children``, re-expanded with new seeds."""
    proposer = HFStepProposer(
        model, tok, step_delimiter="\n", max_step_tokens=args.step_tokens, max_batch_size=args.width
    )
    batch = prompts(max(1, args.width // args.children))
    start, cpu, call = time.perf_counter(), time.process_time(), 0
    while proposer.stats["generated_tokens"] < target_tokens:
        proposer.propose(batch, args.children, [call * len(batch) + i for i in range(len(batch))])
        call += 1
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "tokens": proposer.stats["generated_tokens"],
        "seconds": seconds,
        "cpu": cpu,
        "stats": proposer.stats,
    }


def measure(model, tok, args) -> dict[str, dict[str, Any]]:
    """All variants, interleaved ``args.repeats`` times; the fastest run of each is kept (the box may be shared)."""
    warm = argparse.Namespace(**{**vars(args), "prompts": 2, "simulations": 2, "sequential_prompts": 1})
    run_search(model, tok, warm, sequential=False)  # warm-up: allocator, kernels, tokenizer
    run_generate(model, tok, warm, 1)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeats):
        runs = {"search": run_search(model, tok, args, sequential=False)}
        runs["generate"] = run_generate(model, tok, args, runs["search"]["tokens"])
        runs["propose"] = run_propose(model, tok, args, runs["search"]["tokens"] // 4)
        runs["sequential"] = run_search(model, tok, args, sequential=True)
        for name, r in runs.items():
            if name not in best or r["seconds"] / r["tokens"] < best[name]["seconds"] / best[name]["tokens"]:
                best[name] = r
    return best


def report(args, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the table; return the summary (printed last, as one JSON line)."""
    rate = {k: r["tokens"] / r["seconds"] for k, r in runs.items()}
    cpu = {k: r["tokens"] / r["cpu"] for k, r in runs.items()}
    s, seq = runs["search"]["stats"], runs["sequential"]["stats"]
    per_fwd = {k: r["tokens"] / r["stats"]["forward_passes"] for k, r in runs.items() if "stats" in r}
    host = platform.processor() or platform.machine()
    print(f"model {args.model} ({args.dtype}, {args.device}, {torch.get_num_threads()} threads) on {host}")
    notes = {
        "generate": f"(a) model.generate, width {args.width}, {runs['generate']['calls']} calls",
        "search": f"(b) MCTS, {args.prompts} trees x {args.simulations} sims, max_batch_size {args.width}, "
        f"cache on, {per_fwd['search']:.0f} tokens/forward",
        "sequential": f"(c) MCTS, {args.sequential_prompts} tree(s) one leaf at a time, width 1, no cache",
        "propose": f"(d) propose() alone at width {args.width}, {per_fwd['propose']:.0f} tokens/forward",
    }
    print(f"{'variant':<12}{'tokens':>9}{'seconds':>9}{'tok/s':>9}{'cpu tok/s':>11}  notes")
    for name in ("generate", "search", "sequential", "propose"):
        r = runs[name]
        print(
            f"{name:<12}{r['tokens']:>9}{r['seconds']:>9.2f}{rate[name]:>9.0f}{cpu[name]:>11.0f}  {notes[name]}"
        )
    print("search backend stats:", s)
    return {
        "search_tok_s": round(rate["search"], 1),
        "generate_tok_s": round(rate["generate"], 1),
        "sequential_tok_s": round(rate["sequential"], 1),
        "ratio_vs_generate": round(rate["search"] / rate["generate"], 3),
        "speedup_vs_sequential": round(rate["search"] / rate["sequential"], 2),
        "reencoded_per_generated": round(s["reencoded_tokens"] / max(s["generated_tokens"], 1), 4),
        "cpu_ratio_vs_generate": round(cpu["search"] / cpu["generate"], 3),
        "cpu_speedup_vs_sequential": round(cpu["search"] / cpu["sequential"], 2),
        "propose_ratio_vs_generate": round(rate["propose"] / rate["generate"], 3),
        "search_tokens_per_forward": round(per_fwd["search"], 1),
        "prefill_per_generated": round(s["prefill_tokens"] / max(s["generated_tokens"], 1), 4),
        "sequential_reencoded_per_generated": round(
            seq["reencoded_tokens"] / max(seq["generated_tokens"], 1), 3
        ),
        "search_tokens": runs["search"]["tokens"],
        "model": args.model,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "width": args.width,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--prompts", type=int, default=32, help="trees searched together in (b)")
    ap.add_argument("--sequential-prompts", type=int, default=1, help="trees searched one by one in (c)")
    ap.add_argument("--simulations", type=int, default=16)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--max-depth", type=int, default=4)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--width", type=int, default=64, help="batch width: max_batch_size of (b), batch of (a)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="interleaved repetitions; the best of each is kept"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load(args.model, args.dtype, args.device)
    result = report(args, measure(model, tok, args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
