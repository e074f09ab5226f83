"""Tests for thinktree.trainer.algos.dpo: step-level DPO through TRL's DPOTrainer, with per-pair weights.

Tiny 1-layer llama policies (``tiny:llama``) and a handful of hand-made step pairs; every trainer is a few steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from thinktree.trainer.algos import dpo
from thinktree.trainer.algos.dpo import DPOSettings, build_dpo_trainer, prepare_pairs, train_dpo
from thinktree.trainer.models import load_policy

SMALL = {"hidden_size": 32, "num_hidden_layers": 1}
PAIRS = [
    {
        "prompt": "Q: 2+3=?\nA: ",
        "chosen": "2+3=5.",
        "rejected": "2+3=6.",
        "weight": 0.9,
        "key": "a",
        "node": 0,
    },
    {
        "prompt": "Q: 4+4=?\nA: ",
        "chosen": "4+4=8.",
        "rejected": "4+4=9!",
        "weight": 0.5,
        "key": "b",
        "node": 3,
    },
    {
        "prompt": "Q: 7-2=?\nA: 7-2",
        "chosen": "=5.",
        "rejected": "=4 so 4.",
        "weight": 0.3,
        "key": "c",
        "node": 1,
    },
    {
        "prompt": "Q: 3*3=?\nA: ",
        "chosen": "3*3=9.",
        "rejected": "3*3=6.",
        "weight": 0.7,
        "key": "d",
        "node": 2,
    },
]


def tiny(seed: int = 0, lora: dict | None = None):
    return load_policy("tiny:llama", tiny_sizes=SMALL, seed=seed, lora=lora)


def settings(**overrides) -> DPOSettings:
    base = dict(
        steps=6, learning_rate=1e-2, per_device_batch_size=4, warmup_ratio=0.0, beta=0.5, logging_steps=3
    )
    return DPOSettings(**{**base, **overrides})


def margins(model, tokenizer, pairs) -> torch.Tensor:
    """log p(chosen | prompt) − log p(rejected | prompt) per pair, step tokens only (character-level tokenizer)."""

    def logp(prompt: str, step: str) -> float:
        ids = torch.tensor([tokenizer(prompt + step).input_ids])
        n = len(tokenizer(prompt).input_ids)
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        return logprobs[torch.arange(n - 1, ids.size(1) - 1), targets[n - 1 :]].sum().item()

    return torch.tensor([logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def batch_loss(trainer, rows: list[int], weights: list[float] | None = None) -> torch.Tensor:
    """TRL's training loss on a batch of prepared rows, with the given (already normalised) weights."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    if weights is not None:
        batch["weight"] = torch.tensor(weights)
    trainer.model.zero_grad(set_to_none=True)
    return trainer.compute_loss(trainer.model, batch)


# --------------------------------------------------------------------------------------------------- full model
def test_full_finetune_learns_the_pairs(tmp_path: Path):
    model, tokenizer = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    margin_before = margins(model, tokenizer, PAIRS)
    metrics = train_dpo(model, tokenizer, PAIRS, settings(), tmp_path)
    assert math.isfinite(metrics["train_loss"]) and metrics["num_pairs"] == metrics["num_pairs_used"] == 4
    assert "rewards/margins" in metrics
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    margin_after = margins(model, tokenizer, PAIRS)
    assert margin_after.mean() > margin_before.mean() + 0.5, (margin_before, margin_after)
    assert (margin_after > margin_before).all()
    assert "forward" not in vars(model) and not model.training  # TRL's fused-head patch undone


# ------------------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_only_the_adapter_against_no_model_copy(tmp_path: Path):
    lora = {"r": 4, "lora_alpha": 8}
    model, tokenizer = tiny(lora=lora)
    trainer = build_dpo_trainer(model, tokenizer, PAIRS, settings(), tmp_path)  # lora_reference="start"
    assert trainer.ref_model is None and set(model.peft_config) == {
        "default",
        "ref",
    }  # an adapter copy, no model
    params = dict(model.named_parameters())
    for name, p in params.items():
        if ".ref." in name:
            assert torch.equal(p, params[name.replace(".ref.", ".default.")])
    trainer.remove_weight_hook()
    model, tokenizer = tiny(lora=lora)
    trainer = build_dpo_trainer(model, tokenizer, PAIRS, settings(lora_reference="base"), tmp_path)
    assert trainer.ref_model is None and set(model.peft_config) == {
        "default"
    }  # adapters disabled = reference
    trainer.remove_weight_hook()

    model, tokenizer = tiny(lora={"r": 4, "lora_alpha": 8})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    margin_before = margins(model, tokenizer, PAIRS)
    metrics = train_dpo(model, tokenizer, PAIRS, settings(), tmp_path)
    assert math.isfinite(metrics["train_loss"])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and set(model.peft_config) == {
        "default"
    }  # TRL's "ref" adapter removed
    lora_changed = [n for n in before if "lora_" in n and not torch.equal(after[n], before[n])]
    base_changed = [n for n in before if "lora_" not in n and not torch.equal(after[n], before[n])]
    assert lora_changed and not base_changed
    assert margins(model, tokenizer, PAIRS).mean() > margin_before.mean()
    assert "forward" not in vars(model.get_base_model())


# --------------------------------------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def weighted(tmp_path_factory: pytest.TempPathFactory):
    """A trainer whose reference differs from the policy (so per-pair losses differ), weights 0.9, 0.5, 0.0."""
    pairs = [PAIRS[0], PAIRS[1], {**PAIRS[2], "weight": 0.0}]
    model, tokenizer = tiny()
    ref, _ = tiny(seed=1)
    trainer = build_dpo_trainer(
        model, tokenizer, pairs, settings(), tmp_path_factory.mktemp("w"), ref_model=ref
    )
    yield trainer
    trainer.remove_weight_hook()


def test_weights_multiply_each_pair_loss(weighted):
    w = weighted.train_dataset["weight"]
    assert w == pytest.approx([0.9 / (1.4 / 3), 0.5 / (1.4 / 3), 0.0])  # normalised to mean 1 over all pairs
    single = torch.stack([batch_loss(weighted, [i], [1.0]).detach() for i in range(3)])
    assert len(set(single.tolist())) == 3  # the pairs really have different losses
    loss = batch_loss(weighted, [0, 1, 2])
    assert loss.item() == pytest.approx((torch.tensor(w) * single).mean().item(), rel=1e-5)
    doubled = batch_loss(weighted, [0], [2.0])
    assert doubled.item() == pytest.approx(2 * single[0].item(), rel=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "robust"])
def test_weights_multiply_other_loss_types(loss_type: str, tmp_path: Path):
    model, tokenizer = tiny()
    ref, _ = tiny(seed=1)
    conf = settings(loss_type=loss_type, label_smoothing=0.1)
    trainer = build_dpo_trainer(model, tokenizer, PAIRS[:3], conf, tmp_path, ref_model=ref)
    single = torch.stack([batch_loss(trainer, [i], [1.0]).detach() for i in range(3)])
    expected = (torch.tensor(trainer.train_dataset["weight"]) * single).mean().item()
    loss = batch_loss(trainer, [0, 1, 2])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert grads(model)
    trainer.remove_weight_hook()


def test_zero_weight_pair_contributes_no_gradient(weighted):
    batch_loss(weighted, [2]).backward()  # the weight-0 pair alone
    assert all(torch.count_nonzero(g) == 0 for g in grads(weighted.model).values())

    with_zero = batch_loss(weighted, [0, 1, 2])  # weights normalised over 3 pairs
    with_zero.backward()
    g3 = grads(weighted.model)
    without = batch_loss(weighted, [0, 1], [0.9 / 0.7, 0.5 / 0.7])  # the same two pairs normalised over 2
    without.backward()
    g2 = grads(weighted.model)
    assert with_zero.item() == pytest.approx(without.item(), rel=1e-5)  # both are sum(w·loss) / sum(w)
    assert g3.keys() == g2.keys() and g3
    for name in g3:
        torch.testing.assert_close(g3[name], g2[name], rtol=1e-4, atol=1e-7)


def test_unweighted_is_plain_dpo(tmp_path: Path):
    model, tokenizer = tiny()
    ref, _ = tiny(seed=1)
    trainer = build_dpo_trainer(
        model, tokenizer, PAIRS[:3], settings(use_weights=False), tmp_path, ref_model=ref
    )
    assert "weight" not in trainer.train_dataset.column_names and trainer.weight_column is None
    single = [batch_loss(trainer, [i]).item() for i in range(3)]
    assert batch_loss(trainer, [0, 1, 2]).item() == pytest.approx(sum(single) / 3, rel=1e-5)


def test_steps_get_no_eos_unless_asked(tmp_path: Path):
    model, tokenizer = tiny()
    eos = tokenizer.eos_token_id
    pairs = [PAIRS[0], {**PAIRS[1], "chosen": PAIRS[1]["chosen"] + tokenizer.eos_token}]
    plain = build_dpo_trainer(model, tokenizer, pairs, settings(), tmp_path).train_dataset
    assert plain[0]["chosen_ids"][-1] != eos and plain[0]["rejected_ids"][-1] != eos
    assert plain[0]["chosen_ids"] == tokenizer(PAIRS[0]["chosen"]).input_ids
    assert (
        plain[1]["chosen_ids"][-1] == eos and plain[1]["rejected_ids"][-1] != eos
    )  # an explicit EOS is kept
    trl_default = build_dpo_trainer(
        model, tokenizer, pairs, settings(append_eos=True), tmp_path
    ).train_dataset
    assert all(row[k][-1] == eos for row in trl_default for k in ("chosen_ids", "rejected_ids"))


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ([], "no preference pairs"),
        (
            Dataset.from_dict({"prompt": [], "chosen": [], "rejected": [], "weight": []}),
            "no preference pairs",
        ),
        ([{"prompt": "p", "chosen": "a", "weight": 1.0}], r"lack columns \['rejected'\]"),
        (Dataset.from_dict({"prompt": ["p"], "chosen": ["a"], "weight": [1.0]}), "lack columns"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "use_weights=False"),
        ([{"prompt": "p", "chosen": "", "rejected": "b", "weight": 1.0}], "non-empty string"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1.0}], "finite and >= 0"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": float("nan")}], "finite and >= 0"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0.0}], "weight 0"),
        (["not a dict"], "mappings"),
    ],
)
def test_bad_pairs_raise_value_error(pairs, match, tmp_path: Path):
    with pytest.raises(ValueError, match=match):
        prepare_pairs(pairs)
    with pytest.raises(ValueError, match=match):
        train_dpo(None, None, pairs, settings(), tmp_path)  # type: ignore[arg-type]  # fails before touching a model


def test_bad_settings_raise_value_error(tmp_path: Path):
    assert prepare_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"}], use_weights=False).num_rows == 1
    model, tokenizer = tiny()
    for loss_type in ("aot", "hinge", "sft", ("sigmoid", "sft")):
        with pytest.raises(ValueError, match="cannot be weighted per pair"):
            build_dpo_trainer(model, tokenizer, PAIRS, settings(loss_type=loss_type), tmp_path)
    with pytest.raises(ValueError, match="lora_reference"):
        build_dpo_trainer(model, tokenizer, PAIRS, settings(lora_reference="ref"), tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        build_dpo_trainer(model, tokenizer, PAIRS, settings(max_length=4), tmp_path)
    assert dpo.WEIGHT_COLUMN == "weight"
