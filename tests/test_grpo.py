"""Tree-GRPO on a tiny model (CPU, one process): loss algebra by hand, clipping, skipping, accumulation, prompt ids."""

from __future__ import annotations

import math
import random

import pytest
import torch

from thinktree.trainer.algos.batching import PromptIds, prompt_ids, shard, step_plan
from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import GRPO, LossNorm, clipped_pg_loss, k3_kl, normalise
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.models import load_policy


def make_records(n: int, seed: int = 0, adv: float | None = None) -> list[dict]:
    g = random.Random(seed)
    out = []
    for i in range(n):
        k = g.randint(2, 7)
        a = g.uniform(-1, 1) if adv is None else adv
        out.append({"prompt": f"Q{i}: {i}*3=", "completion_ids": [g.randint(4, 60) for _ in range(k)],
                    "advantages": [a + 0.1 * j for j in range(k)] if adv is None else [a] * k,
                    "old_logprobs": [-4.6] * k, "loss_mask": [1] * k, "prefix_len": 0})  # fmt: skip
    return out


def params_of(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.policy.named_parameters()}


def engine_for(cfg: TrainConfig, lora: dict | None = None, optimizer=None) -> Engine:
    model, tok = load_policy("tiny:llama", seed=0, lora=lora)
    return Engine(model, tok, cfg, optimizer=optimizer)


# --------------------------------------------------------------------------------------------- pure loss algebra
def test_normalisation_matches_hand_computation():
    # Two sequences: row 0 trains 2 tokens (values 1, 3), row 1 trains 3 tokens (2, 2, 5); one padded slot each.
    per_token = torch.tensor([[1.0, 3.0, 9.0, 9.0], [2.0, 2.0, 5.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    # dapo: (1+3+2+2+5) / 5 tokens = 13/5
    assert normalise(per_token, mask, LossNorm("dapo", 5.0, 2, 4)).item() == pytest.approx(13 / 5)
    # grpo: mean(2, 3) = 2.5  (row means 4/2 and 9/3)
    assert normalise(per_token, mask, LossNorm("grpo", 5.0, 2, 4)).item() == pytest.approx(2.5)
    # dr_grpo: 13 / (2 sequences x max length 6) = 13/12
    assert normalise(per_token, mask, LossNorm("dr_grpo", 5.0, 2, 6)).item() == pytest.approx(13 / 12)
    # A micro-batch holding only row 1 of a 4-sequence, 10-token global batch contributes its share only.
    assert normalise(per_token[1:], mask[1:], LossNorm("dapo", 10.0, 4, 4)).item() == pytest.approx(9 / 10)
    assert normalise(per_token[1:], mask[1:], LossNorm("grpo", 10.0, 4, 4)).item() == pytest.approx(3 / 4)
    recs = [{"completion_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"completion_ids": [1] * 5}]
    assert LossNorm.of(recs, [0, 1], "dr_grpo") == LossNorm("dr_grpo", 7.0, 2, 5)
    assert LossNorm.of(recs, [0, 1], "dr_grpo", max_completion_length=64).max_len == 64


def test_clip_gives_zero_gradient_on_the_clipped_side():
    eps = 0.2
    # ratios 1.5, 1.5, 0.5, 0.5, 1.0 with advantages +, -, -, +, +
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0])
    old = torch.full((5,), -2.0)
    logp = (old + ratio.log()).requires_grad_(True)
    loss, r, clipped = clipped_pg_loss(logp, old, adv, eps, eps)
    assert torch.allclose(r, ratio)
    assert clipped.tolist() == [True, False, True, False, False]
    loss.sum().backward()
    g = logp.grad
    assert g[0] == 0 and g[2] == 0  # clipped side: exactly zero
    # unclipped tokens: d(-A r)/dlogp = -A r
    assert torch.allclose(g[[1, 3, 4]], torch.tensor([1.5, -0.5, -2.0]))
    # the clipped tokens' loss is the constant -A (1 +- eps)
    assert loss[0].item() == pytest.approx(-1.2) and loss[2].item() == pytest.approx(0.8)


def test_k3_kl():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(k3_kl(lp, lp), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - lp
    assert torch.allclose(k3_kl(lp, ref), d.exp() - d - 1) and (k3_kl(lp, ref) >= 0).all()


def test_step_plan_and_shard():
    plan = step_plan(10, 4, 2, seed=3)
    assert len(plan) == 6 and all(len(c) == 4 for c in plan)
    first_pass = sorted(set(sum(plan[:3], [])))
    assert first_pass == list(range(10))  # one pass covers every record (padded cyclically)
    assert plan == step_plan(10, 4, 2, seed=3) and plan != step_plan(10, 4, 2, seed=4)
    assert step_plan(10, 4, 2, seed=3, max_steps=2) == plan[:2]
    # train.steps is a count: 7 steps over 3 chunks a pass = 3 passes cut to 7, the first 6 as above
    seven = step_plan(10, 4, 2, seed=3, max_steps=7)
    assert len(seven) == 7 and seven[:6] == plan and sorted(set(seven[6])) == sorted(seven[6])
    assert shard([5, 6, 7, 8], rank=1, world=2, grad_accum=2) == [[6], [8]]
    # groups (tree keys): the trees are shuffled, a tree's records stay together: each step is one whole tree here
    grouped = step_plan(6, 2, 1, seed=0, groups=["a", "b", "a", "b", "c", "c"])
    assert sorted(map(sorted, grouped)) == [[0, 2], [1, 3], [4, 5]]
    assert step_plan(10, 4, 2, seed=3, groups=list(range(10))) == plan  # one record per group: the plain plan


def test_prompt_ids_agree_with_search_backend():
    hf = pytest.importorskip("thinktree.search.backends.hf")
    from tokenizers import processors

    model, tok = load_policy("tiny:llama")
    bos_tok = load_policy("tiny:llama")[1]
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)]
    )
    assert bos_tok("a", add_special_tokens=True)["input_ids"][0] == bos_tok.bos_token_id
    for t in (tok, bos_tok):
        proposer = hf.HFStepProposer(model, t)
        memo = PromptIds(t)
        for text in ("2+3=", "<s>already", " spaced\n"):
            assert prompt_ids(t, text) == memo(text) == list(proposer._prompt(text)[0])
    assert prompt_ids(bos_tok, "x")[0] == bos_tok.bos_token_id and prompt_ids(tok, "x")[0] != tok.bos_token_id


# ------------------------------------------------------------------------------------------------- tiny model
def test_grpo_trains_and_reports_metrics():
    cfg = TrainConfig(per_device_batch_size=2, grad_accum=2, steps=0, num_iterations=2, learning_rate=1e-2)
    engine = engine_for(cfg)
    seen = []
    engine.on_step_end.append(lambda e, m: seen.append(e.optimizer_steps))
    before = params_of(engine)
    history = GRPO(engine, seed=1).train(make_records(8), progress=False)
    assert len(history) == 4 and seen == [1, 2, 3, 4]
    for m in history:
        assert all(
            math.isfinite(m[k]) for k in ("train/loss", "train/pg_loss", "train/grad_norm", "train/entropy")
        )
        assert 0 <= m["train/clip_frac"] <= 1 and m["train/step_skipped"] == 0
    assert "train/logprob_mismatch" in history[0] and all(
        "train/logprob_mismatch" not in m for m in history[1:]
    )
    assert history[0]["train/logprob_mismatch"] > 0
    after = params_of(engine)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with engine.unwrap_for_generation() as policy:
        assert policy is engine.policy


def test_zero_advantages_give_zero_gradient():
    cfg = TrainConfig(per_device_batch_size=4, grad_accum=1, kl_coef=0.0)
    engine = engine_for(cfg)
    records = make_records(4, adv=0.0)
    algo = GRPO(engine)
    batch = engine.collate(records, [0, 1, 2, 3])
    loss, _ = algo.loss(engine.forward(batch), batch, LossNorm.of(records, [0, 1, 2, 3], "dapo"), first=False)
    loss.backward()
    grads = [p.grad for p in engine.model.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)
    engine.raw_optimizer.zero_grad()
    before = params_of(engine)
    algo.step(records, [0, 1, 2, 3], {}, first=False)
    assert all(torch.equal(before[k], v) for k, v in params_of(engine).items())


def test_nan_advantages_and_nan_loss_skip_the_step():
    cfg = TrainConfig(per_device_batch_size=1, grad_accum=2, steps=0, learning_rate=1e-2)
    records = make_records(4, seed=2)
    records[3]["advantages"][0] = float("nan")
    engine = engine_for(cfg)
    algo = GRPO(engine)
    before = params_of(engine)
    m = algo.step(records, [0, 1, 2, 3], {}, first=False)  # the NaN record is in the second micro-batch
    assert m["train/step_skipped"] == 1 and m["train/skipped_steps"] == 1 and "train/loss" not in m
    assert all(torch.equal(before[k], v) for k, v in params_of(engine).items())
    assert all(p.grad is None for p in engine.model.parameters())

    # A loss that turns NaN on the second micro-batch (after a backward): the window's gradients are dropped, so
    # skip-then-step equals a fresh engine taking the good step alone (optimizer and scheduler untouched too).
    class Poison(GRPO):
        def loss(self, out, batch, norm, first):
            loss, parts = super().loss(out, batch, norm, first)
            return (loss * float("nan") if 2 in batch.rows else loss), parts

    poisoned = Poison(engine)
    assert poisoned.step(records, [0, 1, 2, 0], {}, first=False)["train/step_skipped"] == 1
    poisoned.step(records, [0, 1, 1, 0], {}, first=False)
    fresh = engine_for(cfg)
    GRPO(fresh).step(records, [0, 1, 1, 0], {}, first=False)
    assert engine.skipped_steps == 2 and engine.optimizer_steps == 1
    for k, v in params_of(fresh).items():
        assert torch.equal(v, params_of(engine)[k])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grad_accumulation_equivalence(loss_type):
    # Per-device batch 1 x accumulation 4 == batch 4 x accumulation 1, for every loss variant (the normaliser is the
    # whole step's). Plain SGD with lr 1 and no clipping, so the weight change is minus the gradient.
    records = make_records(4, seed=5)
    deltas = []
    for bs, accum in ((1, 4), (4, 1)):
        cfg = TrainConfig(per_device_batch_size=bs, grad_accum=accum, max_grad_norm=0.0, loss_type=loss_type)
        engine = engine_for(cfg, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        before = params_of(engine)
        GRPO(engine).step(records, [0, 1, 2, 3], {}, first=False)
        deltas.append({k: v - before[k] for k, v in params_of(engine).items()})
    for k in deltas[0]:
        torch.testing.assert_close(deltas[0][k], deltas[1][k], atol=1e-6, rtol=1e-5)
    assert any(d.abs().max() > 0 for d in deltas[0].values())


def test_kl_reference_lora_is_disabled_adapter():
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    cfg = TrainConfig(per_device_batch_size=2, grad_accum=1, steps=2, kl_coef=0.1, learning_rate=5e-2)
    engine = engine_for(cfg, lora=lora)
    assert engine.ref_model is None  # no second copy: the reference is the adapter-disabled base
    records = make_records(4, seed=7)
    history = GRPO(engine).train(records, progress=False)
    assert history[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0 at init: policy == reference
    assert history[1]["train/kl"] > 0
    full = engine_for(TrainConfig(kl_coef=0.1))
    assert full.ref_model is not None and not any(p.requires_grad for p in full.ref_model.parameters())


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8}])
def test_gradient_checkpointing_gives_the_same_step(lora):
    records = make_records(2, seed=9)
    deltas = []
    for on in (False, True):
        cfg = TrainConfig(per_device_batch_size=2, grad_accum=1, max_grad_norm=0.0, gradient_checkpointing=on)
        engine = engine_for(cfg, lora=lora, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
        before = params_of(engine)
        GRPO(engine).step(records, [0, 1], {}, first=False)
        deltas.append({k: v - before[k] for k, v in params_of(engine).items()})
    assert any(d.abs().max() > 0 for d in deltas[1].values())
    for k in deltas[0]:
        torch.testing.assert_close(deltas[0][k], deltas[1][k], atol=1e-6, rtol=1e-5)
