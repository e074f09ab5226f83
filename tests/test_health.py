"""Health metrics: bits/char against hand computations, batching invariance, KL exactly 0 at round 0, retained
accuracy graded by the retained task's own verifier, frozen reference traces, the namespaced round record."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from thinktree.rewards import get_task
from thinktree.rewards.tasks.arith import ArithTask
from thinktree.trainer import health as H
from thinktree.trainer.algos.batching import prompt_ids
from thinktree.trainer.config import SearchConfig
from thinktree.trainer.models import load_policy
from thinktree.trainer.searching import make_prompts

SEARCH = SearchConfig(max_depth=3, max_step_tokens=8, max_batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spin-waits badly on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def arith():
    task = get_task("arith", ops=(1, 2), digits=2)
    rows = task.load("test", n=16, seed=0)
    return task, rows


def pairs(rows, n: int) -> tuple[list[str], list[str]]:
    return list(rows["prompt"][:n]), list(rows["solution"][:n])


def sgd_steps(model, tokenizer, prompts, completions, steps: int, lr: float) -> None:
    """Plain teacher-forced cross-entropy on the completion tokens (prompt positions masked out)."""
    seqs = [H._encode(tokenizer, [p], [c])[0] for p, c in zip(prompts, completions)]
    ids, att, targets, mask = H._collate(seqs, tokenizer.pad_token_id, torch.device("cpu"))
    keep = targets.shape[1] + 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=att).logits[:, -keep:-1]
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same vector ``w`` at every position."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, -1))


# ------------------------------------------------------------------------------------------------ compression
def test_bits_per_char_matches_a_manual_loop_on_two_tokens():
    model, tok = load_policy("tiny:llama", seed=3)
    got = H.bits_per_char(model, tok, ["7"], ["42"])
    p = prompt_ids(tok, "7")  # as the search backend tokenizes prompts
    ids = p + tok("42", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    n = len(p)
    nll_bits = -(lp[n - 1, ids[n]] + lp[n, ids[n + 1]]).item() / math.log(2)
    assert got["tokens"] == 2 and got["chars"] == 2
    assert got["bits_per_char"] == pytest.approx(nll_bits / 2, abs=1e-5)
    assert got["bits_per_token"] == pytest.approx(nll_bits / 2, abs=1e-5)


def test_bits_per_char_with_controlled_logits():
    _, tok = load_policy("tiny:llama")
    v = len(tok)
    w = torch.zeros(v)
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    w[a] = math.log(3.0)  # p(a) = 3 / (v + 2), every other token 1 / (v + 2)
    got = H.bits_per_char(FixedLogits(w), tok, ["xyz", "q"], ["ab", "a"])
    want = (-math.log2(3 / (v + 2)) * 2 - math.log2(1 / (v + 2))) / 3
    assert got["bits_per_char"] == pytest.approx(want, abs=1e-5)
    assert got["tokens"] == 3 and got["sequences"] == 2


def test_bits_per_char_falls_when_trained_on_the_traces(arith):
    _, rows = arith
    prompts, sols = pairs(rows, 12)
    model, tok = load_policy("tiny:llama", seed=0)
    before = H.bits_per_char(model, tok, prompts, sols)["bits_per_char"]
    sgd_steps(model, tok, prompts, sols, steps=40, lr=1e-2)
    after = H.bits_per_char(model, tok, prompts, sols)["bits_per_char"]
    assert after < 0.7 * before, (before, after)


def test_batch_size_and_padding_do_not_change_the_numbers(arith):
    _, rows = arith
    prompts, sols = pairs(rows, 8)
    completions = [s[: 3 + 5 * i] for i, s in enumerate(sols)]  # ragged lengths; prompts differ in length too
    model, tok = load_policy("tiny:llama", seed=1)
    ref = H.snapshot_reference(model)
    sgd_steps(model, tok, prompts, sols, steps=1, lr=1e-2)
    one = H.policy_drift(model, tok, prompts, completions, ref, batch_size=1)
    eight = H.policy_drift(model, tok, prompts, completions, ref, batch_size=8)
    for key in ("bits_per_char", "bits_per_token", "kl", "entropy"):
        assert one[key] == pytest.approx(eight[key], abs=1e-5), key
    assert one["tokens"] == eight["tokens"] == sum(len(c) for c in completions)


# ---------------------------------------------------------------------------------------------------- drift
def test_kl_is_zero_at_round0_and_positive_after_one_step(arith):
    _, rows = arith
    prompts, sols = pairs(rows, 6)
    model, tok = load_policy("tiny:llama", seed=2)
    ref = H.snapshot_reference(model)
    assert not any(p.requires_grad for p in ref.parameters())
    d0 = H.policy_drift(model, tok, prompts, sols, ref)
    assert abs(d0["kl"]) <= 1e-6 and d0["entropy"] > 0
    assert math.isnan(H.policy_drift(model, tok, prompts, sols)["kl"])  # no reference for a plain model
    sgd_steps(model, tok, prompts, sols, steps=1, lr=1e-3)
    assert H.policy_drift(model, tok, prompts, sols, ref)["kl"] > 1e-7


def test_kl_through_disabled_lora_adapter(arith):
    _, rows = arith
    prompts, sols = pairs(rows, 6)
    model, tok = load_policy("tiny:llama", seed=2, lora={"r": 4, "lora_alpha": 8})
    d0 = H.policy_drift(model, tok, prompts, sols)  # LoRA: the adapter-disabled base, B = 0 so far
    assert abs(d0["kl"]) <= 1e-6
    snap = H.snapshot_reference(model)  # merged round-0 copy
    assert abs(H.policy_drift(model, tok, prompts, sols, snap)["kl"]) <= 1e-6
    sgd_steps(model, tok, prompts, sols, steps=1, lr=1e-2)
    assert H.policy_drift(model, tok, prompts, sols, H.ADAPTER)["kl"] > 1e-7
    assert H.policy_drift(model, tok, prompts, sols, snap)["kl"] > 1e-7


# ------------------------------------------------------------------------------------------------ forgetting
def test_retained_accuracy_is_graded_by_the_retained_tasks_verifier(monkeypatch):
    model, tok = load_policy("tiny:llama", seed=0)
    calls: list[tuple[list, list]] = []
    original = ArithTask.reward

    def spy(self, completions, answer=None, **kw):
        out = original(self, completions, answer, **kw)
        calls.append((list(completions), list(out)))
        return out

    monkeypatch.setattr(ArithTask, "reward", spy)
    got = H.retained_accuracy(model, tok, "arith", {"ops": (1, 1)}, n=5, seed=0, search_cfg=SEARCH)
    graded = [r for _, rs in calls for r in rs]
    assert got["num_prompts"] == 5 and len(graded) == 5
    assert got["accuracy"] == sum((r or 0) >= 0.5 for r in graded) / 5
    monkeypatch.setattr(
        ArithTask, "reward", lambda self, completions, answer=None, **kw: [1.0] * len(completions)
    )
    assert H.retained_accuracy(model, tok, "arith", {}, n=5, seed=0, search_cfg=SEARCH)["accuracy"] == 1.0


def test_general_text_chunks_respect_the_token_limit():
    _, tok = load_policy("tiny:llama")
    text = H.GENERAL_TEXT.read_text()
    assert 15_000 <= len(text.encode()) <= 20_000 and text.isascii()
    chunks = H.load_general_text(tok, max_tokens=100)
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 100 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost or reordered


def test_forgetting_report_deltas_and_warning():
    r0 = {"health/retained_accuracy": 0.50, "health/general_nll_bits_per_char": 3.0}
    ok = H.forgetting_report(
        {"health/retained_accuracy": 0.47, "health/general_nll_bits_per_char": 3.5}, r0, 5.0
    )
    assert ok["health/retained_accuracy_delta_pts"] == pytest.approx(-3.0)
    assert ok["health/general_nll_bits_per_char_delta"] == pytest.approx(0.5)
    assert ok["health/forgetting_warn"] is False
    bad = H.forgetting_report({"health/retained_accuracy": 0.40}, r0, 5.0)
    assert bad["health/forgetting_warn"] is True


# --------------------------------------------------------------------------------------------- the round
def test_freeze_reference_traces_keeps_verified_ones_and_is_written_once(tmp_path, arith):
    task, rows = arith
    prompts = make_prompts(task, rows.select(range(4)))
    sols = list(rows["solution"][:4])
    sols[1] = "Answer: 123456"  # wrong: dropped
    path = tmp_path / "ref.json"
    first = H.freeze_reference_traces(path, task, prompts, sols)
    assert [t["key"] for t in first] == [0, 2, 3] and first[0]["completion"] == sols[0]
    assert H.freeze_reference_traces(path, task, prompts, ["nonsense"] * 4) == first  # reloaded, not redone


def test_health_metrics_round_record(arith):
    task, rows = arith
    model, tok = load_policy("tiny:llama", seed=0)
    prompts = make_prompts(task, rows.select(range(4)))
    traces = [{"prompt": p, "completion": s} for p, s in zip(*pairs(rows, 4))]
    chunks = H.load_general_text(tok, max_tokens=64)[:4]
    retained = {"task_name": "arith", "task_kwargs": {"ops": (1, 1)}, "n": 3, "seed": 0, "search_cfg": SEARCH}
    out = H.health_metrics(
        model, tok, reference=H.snapshot_reference(model), traces=traces, general_text_chunks=chunks,
        retained=retained, task=task, prompts=prompts, search_cfg=SEARCH,
    )  # fmt: skip
    want = {"bits_per_char_ref", "bits_per_token_ref", "bits_per_char_own", "general_nll_bits_per_char",
            "retained_accuracy", "kl_from_round0", "entropy", "time_s"}  # fmt: skip
    assert set(out) == {f"health/{k}" for k in want}
    assert abs(out["health/kl_from_round0"]) <= 1e-6 and out["health/time_s"] > 0
    assert all(math.isfinite(v) for v in out.values())
