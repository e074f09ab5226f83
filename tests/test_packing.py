"""Tree packing (trainer/algos/packing.py): layout by hand, packed == unpacked log-probs, gradients, DDP, fallback.

Also a script: ``accelerate launch --config_file recipes/accelerate/cpu_ddp_2.yaml tests/test_packing.py --out DIR``
runs one packed GRPO step on 2 processes and writes the weights (used by ``test_ddp_packed_step_equals_unpacked``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO
from thinktree.trainer.algos.packing import PackedBatch, pack_batch, pack_paths, prefix_sharing
from thinktree.trainer.algos.ppo import PPO
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def tree_records(seed: int = 0, n_trees: int = 2, leaves: int = 4) -> list[dict]:
    """Path records of small random trees: per tree a prompt, a shared first step, then branching steps.

    Old log-probs are one value per distinct (prompt, prefix) token, as a search gives them; advantages differ per
    path (each leaf's own), so shared tokens carry several advantages.
    """
    g = random.Random(seed)
    old: dict[tuple, float] = {}
    out = []
    for t in range(n_trees):
        prompt = f"T{t}: {t + 3}*{t + 4}="
        stem = [g.randint(4, 60) for _ in range(g.randint(2, 5))]
        mids = [[g.randint(4, 60) for _ in range(g.randint(1, 4))] for _ in range(2)]
        for leaf in range(leaves):
            c = stem + mids[leaf % 2] + [g.randint(4, 60) for _ in range(g.randint(1, 5))]
            olds = [old.setdefault((prompt, *c[: j + 1]), -4.6 + g.uniform(-0.6, 0.6)) for j in range(len(c))]
            adv = g.uniform(-1, 1)
            rew = float(adv > 0)
            ends = [len(stem), len(stem) + len(mids[leaf % 2]), len(c)]
            out.append({"prompt": prompt, "completion_ids": c, "advantages": [adv + 0.05 * j for j in range(len(c))],
                        "old_logprobs": olds, "loss_mask": [0] * 1 + [1] * (len(c) - 1), "prefix_len": 0,
                        "reward": rew, "step_ends": ends})  # fmt: skip
    return out


def engine_for(
    cfg: TrainConfig, arch: str = "llama", lora: dict | None = None, attn: str | None = None, **kw
):
    model, tok = load_policy(f"tiny:{arch}", seed=0, lora=lora)
    if attn is not None:
        model.set_attn_implementation(attn)
    return Engine(model, tok, cfg, **kw)


def sgd(ps):
    return torch.optim.SGD(ps, lr=1.0)


def params_of(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.wrapper.named_parameters()}


# ----------------------------------------------------------------------------------------------- layout by hand
def test_pack_paths_layout_by_hand():
    seqs = [[1, 2, 4], [1, 2, 3], [1, 5], [1, 2, 3], [7]]
    lay = pack_paths(seqs, budget=100)
    # sorted: [1,2,3] (x2), [1,2,4], [1,5], [7]; pre-order trie: 1 2 3 4 5 | 7 (a second root in the same bin)
    assert lay.tokens == [[1, 2, 3, 4, 5, 7]]
    assert lay.parents == [[-1, 0, 1, 1, 0, -1]]
    assert lay.depths == [[0, 1, 2, 2, 1, 0]]
    assert lay.paths == [(0, [0, 1, 3]), (0, [0, 1, 2]), (0, [0, 4]), (0, [0, 1, 2]), (0, [5])]
    assert lay.path_tokens == 12 and lay.packed_tokens == 6 and prefix_sharing(lay) == pytest.approx(0.5)
    # budget 4: bin 0 takes [1,2,3] twice (3 tokens) and [1,2,4] (+1 = 4); [1,5] would make 5 -> a new bin where
    # its root is repeated as context; [7] fits beside it.
    small = pack_paths(seqs, budget=4)
    assert small.tokens == [[1, 2, 3, 4], [1, 5, 7]]
    assert small.paths[2] == (1, [0, 1]) and small.paths[0] == (0, [0, 1, 3]) and small.paths[4] == (1, [2])
    # a single path over budget gets a bin of its own
    assert pack_paths([[1, 2, 3, 4, 5], [1, 2]], budget=3).tokens == [[1, 2], [1, 2, 3, 4, 5]]
    with pytest.raises(ValueError):
        pack_paths([[1]], budget=0)


def test_tree_mask_positions_and_sources_by_hand():
    _, tok = load_policy("tiny:llama")
    from thinktree.trainer.algos.batching import PromptIds

    prompts = PromptIds(tok)
    p = prompts("ab")
    assert len(p) == 2  # character tokenizer, no BOS
    recs = [{"prompt": "ab", "completion_ids": c, "advantages": [0.0] * len(c), "old_logprobs": [0.0] * len(c)}
            for c in ([10, 11], [10, 12, 13])]  # fmt: skip
    pb = pack_batch(recs, [0, 1], prompts, 0, budget=64)
    # trie: a b 10 11 12 13 with parents -1 0 1 2 2 4; depths 0 1 2 3 3 4
    assert pb.packed_ids.tolist() == [[*p, 10, 11, 12, 13]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 3, 4]]
    ancestors = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 4], [0, 1, 2, 4, 5]]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for q, row in enumerate(ancestors):
        want[q, row] = True
    assert torch.equal(pb.tree_mask[0, 0], want)
    # logits kept at the predictors of completion tokens: b (-> 10), 10 (-> 11, 12), 12 (-> 13)
    assert pb.keep.tolist() == [[False, True, True, False, True, False]]
    # window starts at prompt length - 1 = 1: row 0 targets 10, 11 (then pad); row 1 targets 10, 12, 13
    assert pb.targets.tolist() == [[10, 11, 0], [10, 12, 13]]
    assert pb.source[0, :2].tolist() == [0, 1] and pb.source[1].tolist() == [0, 1, 2]
    eager = pb.attention_mask_for("eager", torch.float32)
    assert eager[0, 0, 3, 4] == torch.finfo(torch.float32).min and eager[0, 0, 4, 2] == 0
    assert isinstance(pb.to("cpu"), PackedBatch)


# ------------------------------------------------------------------------------------- equality on tiny models
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_unpacked(arch, lora, attn):
    records = tree_records(seed=1)
    rows = list(range(len(records)))
    engine = engine_for(TrainConfig(pack_tokens=64), arch, lora, attn, value_head=True)
    if lora is not None:  # LoRA B is zero at init: make the adapters act so the test covers them
        with torch.no_grad():
            for name, p in engine.policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the value head starts at zero: give it weights
        engine.wrapper.v_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    plain = engine.collate(records, rows)
    for budget in (4096, 24):  # one bin; several bins with repeated ancestors
        packed = pack_batch(records, rows, engine.prompts, engine.pad_id, budget)
        assert packed.sharing > 0.2 if budget == 4096 else packed.packed_ids.shape[0] > 1
        for train in (False, True):
            a = engine.forward(plain, values=True, train=train)
            b = engine.forward(packed, values=True, train=train)
            m = plain.mask > 0
            assert (a.logprobs - b.logprobs)[m].abs().max() < 1e-5
            assert (a.values - b.values)[m].abs().max() < 1e-5
            if train:
                assert (a.entropy - b.entropy)[m].abs().max() < 1e-5
    assert m.sum() > 40 and a.values[m].abs().max() > 0


def _step_delta(cfg: TrainConfig, records: list[dict], algo_cls=GRPO, chunk=None) -> tuple[dict, dict]:
    engine = engine_for(cfg, optimizer=sgd, value_head=algo_cls.value_head)
    algo = algo_cls(engine)
    before = params_of(engine)
    chunk = chunk if chunk is not None else list(range(len(records)))
    metrics = algo.step(records, chunk, algo.precompute(records), first=True)
    assert metrics["train/step_skipped"] == 0
    assert getattr(algo, "_pack_problem", "unpacked") == ("unpacked" if cfg.pack_tokens == 0 else None)
    return {k: v - before[k] for k, v in params_of(engine).items()}, metrics


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_packed_gradient_equals_unpacked(loss_type):
    # SGD with lr 1 and no clipping: the weight change is minus the gradient. KL to a frozen reference is on (the
    # reference logprobs are a per-path field), and the records' rows are regrouped into 2 packed micro-batches.
    records = tree_records(seed=2)
    chunk = [5, 0, 3, 6, 1, 2, 7, 4]
    out = []
    for pack in (0, 48):
        cfg = TrainConfig(per_device_batch_size=4, grad_accum=2, max_grad_norm=0.0, loss_type=loss_type,
                          kl_coef=0.05, clip_coef=0.1, pack_tokens=pack)  # fmt: skip
        out.append(_step_delta(cfg, records, chunk=chunk))
    (d0, m0), (d1, m1) = out
    assert any(d.abs().max() > 1e-4 for d in d0.values())
    for k in d0:
        torch.testing.assert_close(d1[k], d0[k], atol=2e-6, rtol=1e-4, msg=k)
    for k in ("train/loss", "train/pg_loss", "train/kl", "train/entropy", "train/clip_frac",
              "train/logprob_mismatch"):  # fmt: skip
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
    assert 0 < m0["train/clip_frac"] < 1  # both sides of the clip are exercised


def test_ppo_value_loss_gradient_equals_unpacked():
    records = tree_records(seed=3)
    out = []
    for pack in (0, 4096):
        cfg = TrainConfig(
            per_device_batch_size=8, grad_accum=1, max_grad_norm=0.0, vf_coef=0.5, pack_tokens=pack
        )
        # zero advantages isolate the value loss (the value head starts at zero: give it weights first)
        engine = engine_for(cfg, optimizer=sgd, value_head=True)
        with torch.no_grad():
            engine.wrapper.v_head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
            engine.wrapper.v_head.bias.fill_(0.2)
        algo = PPO(engine)
        extra = algo.precompute(records)
        extra["advantages"] = [[0.0] * len(a) for a in extra["advantages"]]
        before = params_of(engine)
        m = algo.step(records, list(range(8)), extra, first=False)
        assert getattr(algo, "_pack_problem", "unpacked") == ("unpacked" if pack == 0 else None)
        out.append(({k: v - before[k] for k, v in params_of(engine).items()}, m))
    (d0, m0), (d1, m1) = out
    assert d0["v_head.weight"].abs().max() > 1e-4 and m0["train/value_loss"] > 0
    assert m1["train/value_loss"] == pytest.approx(m0["train/value_loss"], rel=1e-5)
    for k in d0:
        torch.testing.assert_close(d1[k], d0[k], atol=2e-6, rtol=1e-4, msg=k)


def test_model_without_tree_attention_falls_back_with_a_warning():
    # Mamba reports attn_implementation "eager" but has no attention: the probe's packed forward fails on it.
    records = tree_records(seed=4, n_trees=1, leaves=2)
    deltas = []
    for pack in (0, 256):
        cfg = TrainConfig(per_device_batch_size=2, grad_accum=1, max_grad_norm=0.0, pack_tokens=pack)
        engine = engine_for(cfg, "mamba", optimizer=sgd)
        algo = GRPO(engine)
        before = params_of(engine)
        if pack:
            with pytest.warns(UserWarning, match="training unpacked"):
                algo.step(records, [0, 1], {}, first=False)
            assert algo._pack_problem.startswith(
                ("packed forward failed", "packed and unpacked log-probs differ")
            )
        else:
            algo.step(records, [0, 1], {}, first=False)
        deltas.append({k: v - before[k] for k, v in params_of(engine).items()})
    for k in deltas[0]:
        assert torch.equal(deltas[0][k], deltas[1][k]), k


# ---------------------------------------------------------------------------------------------------- 2 x DDP
def _ddp_run(world: int, pack: int) -> tuple[Engine, GRPO]:
    cfg = TrainConfig(per_device_batch_size=8 // world, grad_accum=1, max_grad_norm=0.0, loss_type="grpo",
                      pack_tokens=pack, log_entropy=False)  # fmt: skip
    engine = engine_for(cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    records = tree_records(seed=6)
    algo = GRPO(engine)
    for chunk in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]):
        assert algo.step(records, chunk, {}, first=False)["train/step_skipped"] == 0
    return engine, algo


def test_ddp_packed_step_equals_unpacked(tmp_path):
    from launching import free_port, run_launch

    accelerate = Path(sys.executable).parent / "accelerate"

    def cmd() -> list[str]:
        return [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_ddp_2.yaml"),
                "--main_process_port", str(free_port()), __file__, "--out", str(tmp_path)]  # fmt: skip

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ACCELERATE_USE_CPU": "true",
    }
    proc = run_launch(cmd, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["world"] == 2 and "MULTI_CPU" in info["distributed_type"] and info["rank_sums_agree"]
    assert info["packed"] and info["sharing"] > 0.3
    weights = torch.load(tmp_path / "weights.pt")
    ref = {k: v.detach() for k, v in _ddp_run(1, 0)[0].policy.state_dict().items()}
    moved = False
    for k, v in ref.items():
        torch.testing.assert_close(weights[k], v, atol=1e-6, rtol=1e-5, msg=k)
        moved |= not torch.equal(v, load_policy("tiny:llama", seed=0)[0].state_dict()[k])
    assert moved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    engine, algo = _ddp_run(2, pack=4096)
    acc = engine.accelerator
    state = {k: v.detach().clone() for k, v in engine.policy.state_dict().items()}
    total = torch.stack([v.double().sum() for v in state.values()]).sum().reshape(1)
    gathered = acc.gather(total)
    if acc.is_main_process:
        torch.save(state, Path(args.out) / "weights.pt")
        info = {"world": acc.num_processes, "distributed_type": str(acc.distributed_type),
                "rank_sums_agree": bool(gathered.min() == gathered.max()), "packed": algo._pack_problem is None,
                "sharing": algo.last_sharing}  # fmt: skip
        (Path(args.out) / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
