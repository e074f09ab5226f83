"""HFStepProposer: the prefix cache never changes results, only speed; step boundaries; stats."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicLayer

from thinktree.search import StepProposer, StepRecord, Trajectory
from thinktree.search.backends.cache import RecomputeAdapter, _no_kv_reason
from thinktree.search.backends.hf import HFStepProposer
from thinktree.trainer.tiny import build_tiny_model

PROMPTS = ["12+7=", "What is 3*4?\n", "x"]
TOL = {"llama": 1e-9, "qwen2": 1e-9, "gpt2": 1e-9, "mamba": 1e-6}  # Mamba's lm_head casts logits to float32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spin-waits badly on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    out = {}
    for arch in ("llama", "qwen2", "mamba"):
        model, tok = build_tiny_model(arch, seed=1)
        out[arch] = (model.double().eval(), tok)
    out["gpt2"] = (tiny_gpt2(n_positions=1024).double().eval(), out["llama"][1])
    return out


def tiny_gpt2(n_positions: int) -> GPT2LMHeadModel:
    """Learned absolute positions: checks explicit position_ids under left padding (and clamping)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        config = GPT2Config(
            vocab_size=101, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(config)


def full_ids(proposer: HFStepProposer, traj: Trajectory) -> list[int]:
    """Prompt ids (as-is; the tiny tokenizer adds no BOS) + every step's ids (text-only steps: tokenized)."""
    encode = proposer.tokenizer
    ids = encode(traj.prompt, add_special_tokens=False)["input_ids"]
    for s in traj.steps:
        ids += list(s.token_ids) or encode(s.text, add_special_tokens=False)["input_ids"]
    return ids


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax of a full no-cache forward: row j scores token j+1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def grow(proposer, prompts, depth: int, children: int, seed: int = 0) -> list[Trajectory]:
    """Expand every non-finished leaf ``depth`` times over separate propose calls; return all trajectories."""
    frontier = [Trajectory(p, key=k) for k, p in enumerate(prompts)]
    every: list[Trajectory] = []
    for level in range(depth):
        seeds = [seed + 1000 * level + i for i in range(len(frontier))]
        kids = proposer.propose(frontier, children, seeds)
        new = [t.extend(s) for t, ss in zip(frontier, kids) for s in ss]
        every += new
        frontier = [t for t in new if not t.done]
    return every


def assert_matches_recompute(proposer, model, trajs, tol: float) -> None:
    for traj in trajs:
        ids = full_ids(proposer, traj)
        ref = reference_logprobs(model, ids)
        pos = len(ids) - traj.num_tokens
        for step in traj.steps:
            for tok, lp in zip(step.token_ids, step.logprobs):
                assert ids[pos] == tok
                assert abs(ref[pos - 1, tok].item() - lp) < tol, (traj.completion, pos)
                pos += 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mamba", "gpt2"])
def test_cached_logprobs_equal_full_recompute(models, arch):
    model, tok = models[arch]
    proposer = HFStepProposer(model, tok, max_step_tokens=5, max_batch_size=7, step_delimiter="=")
    assert proposer.mode == ("ssm" if arch == "mamba" else "kv")
    trajs = grow(proposer, PROMPTS, depth=3, children=2)
    assert proposer.stats["cache_hits"] > 0 and proposer.stats["reencoded_tokens"] == 0
    # one call mixing remainders of 1 token (cached children) and 8 (a text-only step after a cached prompt):
    # K/V rows get holes between past and input; Mamba rows catch up over different widths
    mixed = [t for t in trajs if not t.done][:5] + [Trajectory(PROMPTS[0]).extend(StepRecord("7+1=8\n"))]
    kids = proposer.propose(mixed, 2, list(range(len(mixed))))
    trajs += [t.extend(s) for t, ss in zip(mixed, kids) for s in ss]
    assert_matches_recompute(proposer, model, trajs, TOL[arch])


def test_recompute_fallback_matches(models):
    model, tok = models["llama"]
    proposer = HFStepProposer(model, tok, max_step_tokens=4, max_batch_size=5)
    proposer.adapter = RecomputeAdapter(proposer._call, proposer.pad_id)  # what an unknown cache type gets
    trajs = grow(proposer, PROMPTS[:2], depth=2, children=2)
    assert_matches_recompute(proposer, model, trajs, TOL["llama"])
    assert proposer.stats["reencoded_tokens"] > 0


def records_equal(a, b, tol: float) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert (x.token_ids, x.text, x.eos, x.truncated) == (y.token_ids, y.text, y.eos, y.truncated)
            assert max((abs(p - q) for p, q in zip(x.logprobs, y.logprobs)), default=0.0) < tol
            assert abs(x.prior - y.prior) < tol


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_batching_and_cache_change_speed_not_results(models, arch):
    model, tok = models[arch]
    kw = dict(max_step_tokens=6, temperature=0.9, top_p=0.95)
    fast = HFStepProposer(model, tok, max_batch_size=64, **kw)
    slow = HFStepProposer(model, tok, max_batch_size=1, cache=False, **kw)
    prefixes = grow(fast, PROMPTS, depth=2, children=2, seed=5)[::2]  # warm cache, mixed depths
    prefixes = [t for t in prefixes if not t.done]
    seeds = [17 * i + 3 for i in range(len(prefixes))]
    batched = fast.propose(prefixes, 3, seeds)
    one_by_one = [slow.propose([t], 3, [s])[0] for t, s in zip(prefixes, seeds)]
    records_equal(batched, one_by_one, TOL[arch])
    shuffled = HFStepProposer(model, tok, max_batch_size=4, **kw).propose(prefixes[::-1], 3, seeds[::-1])
    records_equal(batched, shuffled[::-1], TOL[arch])
    records_equal(fast.propose(prefixes, 3, seeds), batched, TOL[arch])  # warm cache, same call


def test_greedy_is_argmax_and_tiny_top_p_is_greedy(models):
    model, tok = models["qwen2"]
    greedy = HFStepProposer(model, tok, temperature=0, max_step_tokens=6)
    steps = greedy.propose([Trajectory(PROMPTS[0])], 2, [0])[0]
    assert steps[0] == steps[1]
    traj = Trajectory(PROMPTS[0]).extend(steps[0])
    ids = full_ids(greedy, traj)
    ref = reference_logprobs(model, ids)
    start = len(ids) - traj.num_tokens
    assert [int(ref[j - 1].argmax()) for j in range(start, len(ids))] == list(steps[0].token_ids)
    nucleus = HFStepProposer(model, tok, temperature=1.0, top_p=1e-6, max_step_tokens=6)
    assert nucleus.propose([Trajectory(PROMPTS[0])], 3, [9])[0] == [steps[0]] * 3


class ScriptedLM(torch.nn.Module):
    """A fake causal LM with no cache: the token after a sequence of length L is ``script[(L - start) % len]``."""

    def __init__(self, script: list[int], start: int, vocab: int, eos: int) -> None:
        super().__init__()
        self.script, self.start, self.vocab = script, start, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096, vocab_size=vocab, pad_token_id=0)
        self.generation_config = SimpleNamespace(eos_token_id=eos)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        lengths = (
            attention_mask.sum(1)
            if attention_mask is not None
            else torch.full((len(input_ids),), input_ids.shape[1])
        )
        logits = torch.full((len(input_ids), 1, self.vocab), -30.0)
        for b, n in enumerate(lengths.tolist()):
            logits[b, 0, self.script[(n - self.start) % len(self.script)]] = 0.0
        return SimpleNamespace(logits=logits)


def scripted(text: str, prompt: str, eos: bool = False, **kw) -> tuple[HFStepProposer, Trajectory]:
    _, tok = build_tiny_model("llama")
    script = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    model = ScriptedLM(script, start, len(tok), tok.eos_token_id)
    with pytest.warns(
        RuntimeWarning, match=r"no prefix-cache path for ScriptedLM: the model returned no .*O\(L\^2\)"
    ):
        proposer = HFStepProposer(model, tok, **kw)
    assert proposer.mode == "recompute"
    return proposer, Trajectory(prompt)


def test_two_token_delimiter_and_tag():
    proposer, root = scripted("ab\n\ncd\n\nef", "Q:", step_delimiter="\n\n")
    first = proposer.propose([root], 2, [1])[0]
    assert [s.text for s in first] == ["ab\n\n"] * 2 and len(first[0].token_ids) == 4
    second = proposer.propose([root.extend(first[0])], 1, [3])[0][0]
    assert second.text == "cd\n\n" and not second.truncated and not second.eos
    proposer, root = scripted("x=1 <end>y", "Q:", step_delimiter="<end>")
    assert proposer.propose([root], 1, [0])[0][0].text == "x=1 <end>"


def test_eos_and_max_step_tokens():
    proposer, root = scripted("ok", "Q:", eos=True, step_delimiter="\n")
    step = proposer.propose([root], 1, [0])[0][0]
    assert step.eos and step.text == "ok" and step.token_ids[-1] == proposer.tokenizer.eos_token_id
    assert len(step.logprobs) == 3 and abs(step.prior - 1.0) < 1e-6
    proposer, root = scripted("abc", "Q:", step_delimiter="\n", max_step_tokens=7)
    step = proposer.propose([root], 2, [0])[0][0]
    assert step.truncated and not step.eos and step.text == "abcabca"


def test_context_limit_and_empty_input():
    model, tok = build_tiny_model("llama", max_position_embeddings=32)
    proposer = HFStepProposer(model, tok, max_step_tokens=64)
    with pytest.raises(ValueError, match="context"):
        proposer.propose([Trajectory("9" * 40)], 2, [0])
    step = proposer.propose([Trajectory("9" * 28)], 1, [0])[0][0]  # cut at the context end, never past it
    assert len(step.token_ids) <= 4 and (step.truncated or step.eos or "\n" in step.text)
    gpt2 = HFStepProposer(tiny_gpt2(n_positions=32), tok, max_step_tokens=64)  # rows end at different times
    steps = gpt2.propose([Trajectory("9" * 28), Trajectory("9" * 5)], 3, [0, 1])
    assert all(len(s.token_ids) <= 4 for s in steps[0]) and all(len(s.token_ids) <= 27 for s in steps[1])
    assert proposer.propose([], 4, []) == []
    assert isinstance(proposer, StepProposer)


def test_expanding_a_child_reencodes_nothing(models):
    model, tok = models["llama"]
    proposer = HFStepProposer(model, tok, max_step_tokens=6)
    root = Trajectory(PROMPTS[1])
    kids = proposer.propose([root], 3, [0])[0]
    n_prompt = len(full_ids(proposer, root))
    assert proposer.stats["prefill_tokens"] == n_prompt and proposer.stats["reencoded_tokens"] == 0
    children = [root.extend(s) for s in kids if not s.eos]
    proposer.propose(children, 2, list(range(len(children))))
    assert proposer.stats["reencoded_tokens"] == 0
    assert proposer.stats["prefill_tokens"] == n_prompt + len(children)  # only each step's last sampled token
    assert proposer.stats["cache_hits"] == len(children)
    proposer.propose(
        [root], 2, [5]
    )  # re-expanding a node resumes at boundary-1: re-feeds just its last token
    assert proposer.stats["reencoded_tokens"] == 1 and proposer.stats["cache_hits"] == len(children) + 1
    proposer.clear_cache()
    assert proposer.stats["cached_tokens"] == 0


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_eviction_keeps_results_and_counts_reencoding(models, arch):
    model, tok = models[arch]
    tiny = HFStepProposer(model, tok, max_step_tokens=5, cache_max_tokens=20)
    trajs = grow(tiny, PROMPTS[:2], depth=3, children=2)
    assert tiny.stats["evictions"] > 0 and tiny.stats["reencoded_tokens"] > 0
    assert tiny.stats["cached_tokens"] <= 20
    assert_matches_recompute(tiny, model, trajs, TOL[arch])
    big = HFStepProposer(model, tok, max_step_tokens=5)
    again = grow(big, PROMPTS[:2], depth=3, children=2)
    records_equal([t.steps for t in again], [t.steps for t in trajs], TOL[arch])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers v5
def test_peft_wrapped_policy_keeps_the_kv_path(models):
    peft = pytest.importorskip("peft")
    model, tok = build_tiny_model("llama", seed=1)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config).double()
    proposer = HFStepProposer(wrapped, tok, max_step_tokens=5)
    assert proposer.mode == "kv"
    trajs = grow(proposer, PROMPTS[:2], depth=2, children=2)
    assert_matches_recompute(proposer, wrapped, trajs, TOL["llama"])


def test_recompute_warning_once_per_model_and_names_the_attention():
    _, tok = build_tiny_model("llama")
    model = ScriptedLM([5], 0, len(tok), tok.eos_token_id)
    with pytest.warns(RuntimeWarning, match="full recompute"):
        HFStepProposer(model, tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HFStepProposer(model, tok).mode == "recompute"  # same model: no second warning
    call = SimpleNamespace(accepts_positions=True)
    reason = _no_kv_reason([DynamicLayer()], "flash_attention_2", call)
    assert "'flash_attention_2' has no K/V path" in reason and "sdpa" in reason


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_cache_budget_in_bytes(models, arch):
    model, tok = models[arch]
    probe = HFStepProposer(model, tok, max_step_tokens=5)
    grow(probe, PROMPTS[:1], depth=1, children=1)
    per_entry = probe.stats["cached_bytes"] // max(1, len(probe._cache))
    assert per_entry > 0
    budget = 3 * per_entry
    small = HFStepProposer(model, tok, max_step_tokens=5, cache_budget_bytes=budget)
    trajs = grow(small, PROMPTS[:2], depth=3, children=2)
    assert small.stats["evictions"] > 0 and 0 < small.stats["cached_bytes"] <= budget
    assert small.stats["reencoded_tokens"] > 0
    assert_matches_recompute(small, model, trajs, TOL[arch])
    big = HFStepProposer(model, tok, max_step_tokens=5)
    records_equal(
        [t.steps for t in grow(big, PROMPTS[:2], depth=3, children=2)], [t.steps for t in trajs], TOL[arch]
    )
    assert big.stats["evictions"] == 0 and big.cache_budget_bytes > 2**20  # default: a quarter of the memory
    none = HFStepProposer(model, tok, max_step_tokens=5, cache_budget_bytes=0)
    grow(none, PROMPTS[:1], depth=2, children=2)
    assert none.stats["cached_bytes"] == 0 and none.stats["cache_hits"] == 0
    with pytest.raises(ValueError, match="cache_budget_bytes"):
        HFStepProposer(model, tok, cache_budget_bytes=-1)
