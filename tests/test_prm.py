"""Process reward model: one-pass scoring = per-prefix scoring, batching invariance, checkpoints, wrong shapes,
training (BCE/MSE/BT, LoRA, 2-process DDP), AUC and best-of-N reranking metrics, the ValueFn inside a search."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import free_port, run_launch
from safetensors.torch import load_file, save_file

from thinktree.rewards.labels import math_shepherd_labels, ppm_pairs
from thinktree.rewards.prm import (
    HEAD_FILE,
    ORM,
    PRMValueFn,
    ProcessRewardModel,
    StepEncoder,
    aggregate_scores,
    load_prm,
)
from thinktree.search import StepRecord, Trajectory
from thinktree.search.types import ValueFn
from thinktree.trainer.algos.prm import (
    PRMSettings,
    auc,
    load_prm_checkpoint,
    paired_test,
    rerank_metrics,
    save_prm_checkpoint,
    step_metrics,
    stepwise_examples,
    train_prm,
)
from thinktree.trainer.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("3*2=6\n", "1+6=7\n", "", "Answer: 7")
LABELLED = [
    {"prompt": "1+3*2=?\n", "completions": ["3*2=6\n", "1+6=7\n", "Answer: 7"], "labels": [True, True, True]},
    {
        "prompt": "1+3*2=?\n",
        "completions": ["3*2=5\n", "1+5=6\n", "Answer: 6"],
        "labels": [False, False, False],
    },
    {"prompt": "4-1=?\n", "completions": ["4-1=3\n", "Answer: 3"], "labels": [True, True]},
    {"prompt": "4-1=?\n", "completions": ["4-1=2\n", "Answer: 2"], "labels": [False, False]},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_prm(arch: str = "llama", seed: int = 0, double: bool = False) -> tuple[ProcessRewardModel, object]:
    model, tok = build_tiny_model(arch, seed=seed, hidden_size=32)
    torch.manual_seed(seed)
    prm = ProcessRewardModel(model)
    return (prm.double() if double else prm), tok


def traj(prompt: str, steps: tuple[str, ...]) -> Trajectory:
    return Trajectory(prompt, tuple(StepRecord(s) for s in steps))


# ------------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_one_pass_scores_equal_per_prefix_scores(arch):
    prm, tok = tiny_prm(arch, double=True)
    vf = PRMValueFn(prm, tok)
    full = vf.step_scores([traj("1+3*2=?\n", STEPS)])[0]
    assert len(full) == len(STEPS)
    prefix = [vf.step_scores([traj("1+3*2=?\n", STEPS[:k])])[0][-1] for k in range(1, len(STEPS) + 1)]
    np.testing.assert_allclose(full, prefix, rtol=0, atol=1e-12)
    assert full[1] == full[2]  # an empty step adds no token: same boundary


def test_batching_padding_and_order_do_not_change_scores():
    prm, tok = tiny_prm(double=True)
    items = [
        traj("1+3*2=?\n", STEPS),
        traj("9=?\n", STEPS[:1]),
        traj("12+3*2-1=?\n", ("3*2=6\n",)),
        traj("7-2=?\n", ()),
        {"prompt": "4-1=?\n", "completions": ["4-1=3\n", "Answer: 3"]},
    ]
    alone = [PRMValueFn(prm, tok, batch_size=1).step_scores([x])[0] for x in items]
    batched = PRMValueFn(prm, tok, batch_size=8).step_scores(items)
    rev = PRMValueFn(prm, tok, batch_size=3).step_scores(items[::-1])[::-1]
    for a, b, c in zip(alone, batched, rev):
        np.testing.assert_allclose(a, b, atol=1e-12)
        np.testing.assert_allclose(a, c, atol=1e-12)
    root = PRMValueFn(prm, tok)([items[3]])  # no steps: the prompt-boundary score
    assert 0.0 <= root[0] <= 1.0


class CharTok:
    """A minimal tokenizer that adds BOS by default (to check BOS handling and exact boundaries)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, adds_bos: bool) -> None:
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [10 + ord(c) for c in text]
        return {"input_ids": ([1] if add_special_tokens and self.adds_bos else []) + ids}


@pytest.mark.parametrize("adds_bos", [True, False])
def test_encoder_boundaries_and_bos(adds_bos):
    enc = StepEncoder(CharTok(adds_bos))
    ids, ends = enc.encode("ab", ["cd", "", "e"])
    body = [10 + ord(c) for c in "abcde"]
    assert ids == ([1] if adds_bos else []) + body
    off = 1 if adds_bos else 0
    assert ends == [1 + off, 3 + off, 3 + off, 4 + off]
    batch = enc.batch([(ids, ends), ([5], [0])])
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (len(ids) - 1)  # right padding
    assert batch["rows"].tolist() == [0, 0, 0, 0, 1] and batch["cols"].tolist() == [*ends, 0]


def test_aggregates_and_orm():
    assert aggregate_scores([0.9, 0.5, 0.8], "last") == 0.8
    assert aggregate_scores([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate_scores([0.5, 0.5], "prod") == 0.25
    assert aggregate_scores([0.2, 0.4], "mean") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_scores([0.1], "max")
    prm, tok = tiny_prm()
    x = [traj("1+3*2=?\n", STEPS)]
    assert ORM(prm, tok)(x) == PRMValueFn(prm, tok, aggregate="last")(x)
    vf = PRMValueFn(prm, tok, aggregate="min")
    assert isinstance(vf, ValueFn)
    assert vf(x)[0] == pytest.approx(min(vf.step_scores(x)[0]))


# -------------------------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_and_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    prm, tok = tiny_prm()
    x = [traj("1+3*2=?\n", STEPS), traj("4-1=?\n", ("4-1=3\n",))]
    before = PRMValueFn(prm, tok).step_scores(x)
    out = prm.save_pretrained(tmp_path / "prm", tok)
    cfg = json.loads((out / "prm_config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["head_out"] == 1 and cfg["aggregate"] == "last"
    loaded, tok2 = load_prm(out)
    assert PRMValueFn(loaded, tok2).step_scores(x) == before
    plain = AutoModelForCausalLM.from_pretrained(out)  # the backbone dir is a standard HF checkpoint
    ref = prm.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


def test_wrong_shape_checkpoints_raise(tmp_path):
    from transformers import BertConfig, BertModel

    prm, tok = tiny_prm()
    good = prm.save_pretrained(tmp_path / "good", tok)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    state = load_file(str(bad / HEAD_FILE))
    save_file({"weight": torch.zeros(1, 33), "bias": state["bias"]}, str(bad / HEAD_FILE))
    with pytest.raises(ValueError, match="hidden size is 32"):
        load_prm(bad)
    (bad / HEAD_FILE).unlink()
    with pytest.raises(ValueError, match="no value head file"):
        load_prm(bad)
    with pytest.raises(ValueError, match="not a PRM checkpoint"):
        load_prm(tmp_path)
    with pytest.raises(ValueError, match="expected \\(1, 32\\)"):
        ProcessRewardModel(prm.backbone, head=torch.nn.Linear(16, 1))
    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="not a causal LM"):
        ProcessRewardModel(bert)
    enc = tmp_path / "encoder"
    shutil.copytree(good, enc)
    bert.config.save_pretrained(enc)  # overwrite config.json with an encoder's
    with pytest.raises(ValueError, match="not a causal LM"):
        load_prm(enc)


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("objective", ["bce", "mse"])
def test_training_reduces_loss_and_separates_labels(objective):
    prm, tok = tiny_prm()
    fit = train_prm(prm, tok, LABELLED, PRMSettings(objective, steps=25, learning_rate=3e-3, log_every=0))
    assert fit["loss_last"] < 0.5 * fit["loss_first"], fit
    m = step_metrics(PRMValueFn(prm, tok), LABELLED)
    assert m["step_auc"] == 1.0 and m["step_acc"] == 1.0 and m["n_steps"] == 10


def test_bradley_terry_orders_a_pair_after_training():
    prm, tok = tiny_prm(seed=3)
    pair = {"prompt": "2+2=?\n", "chosen": "2+2=4\n", "rejected": "2+2=5\n"}
    vf = PRMValueFn(prm, tok)
    items = [{"prompt": pair["prompt"], "completions": [pair[k]]} for k in ("chosen", "rejected")]
    fit = train_prm(prm, tok, [pair], PRMSettings("bt", steps=15, learning_rate=3e-3, log_every=0))
    good, bad = vf(items)
    assert fit["loss_last"] < fit["loss_first"] and good > bad + 0.5


def test_lora_training_merged_and_adapter_checkpoints(tmp_path):
    from thinktree.trainer.models import load_policy

    backbone, tok = load_policy("tiny:llama", seed=0)
    prm = ProcessRewardModel(backbone)
    settings = PRMSettings("bce", steps=10, learning_rate=5e-3, lora={"r": 4, "lora_alpha": 8}, log_every=0)
    fit = train_prm(prm, tok, LABELLED, settings)
    assert fit["loss_last"] < fit["loss_first"]
    x = [traj("1+3*2=?\n", STEPS)]
    before = PRMValueFn(prm, tok).step_scores(x)[0]
    adapter = save_prm_checkpoint(prm, tok, tmp_path / "adapter", merge_lora=False)
    assert json.loads((adapter / "prm_config.json").read_text())["backbone_format"] == "adapter"
    with pytest.raises(ValueError, match="LoRA adapter"):
        load_prm(adapter)
    np.testing.assert_allclose(
        PRMValueFn(load_prm_checkpoint(adapter)[0], tok).step_scores(x)[0], before, atol=1e-5
    )
    merged = save_prm_checkpoint(prm, tok, tmp_path / "merged")
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    np.testing.assert_allclose(PRMValueFn(load_prm(merged)[0], tok).step_scores(x)[0], before, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- bad input
def _tree(leaves: list[tuple[str, float | None]], terminal: bool = True) -> dict:
    """A root with one child per (text, reward) leaf."""
    nodes = [{"parent": -1, "children": [], "terminal": False, "step": None, "visits": 1, "value_sum": 0.0}]
    for text, reward in leaves:
        nodes[0]["children"].append(len(nodes))
        nodes.append(
            {"parent": 0, "children": [], "terminal": terminal, "reward": reward, "step": {"text": text},
             "visits": 1, "value_sum": reward or 0.0}
        )  # fmt: skip
    return {"prompt": "Q\n", "key": 0, "nodes": nodes}


def test_trees_without_labels_or_pairs_are_counted_and_refused():
    trees = [
        _tree([("a", 1.0)], terminal=False),
        _tree([("a", 1.0), ("b", 1.0)]),
        _tree([("a", 0.0), ("b", None)]),
    ]
    recs, stats = math_shepherd_labels(trees)
    assert (stats["no_terminal"], stats["all_correct"], stats["all_wrong"], stats["records"]) == (1, 1, 1, 4)
    pairs, pstats = ppm_pairs(trees)
    assert pairs == [] and pstats["pairs"] == 0
    prm, tok = tiny_prm()
    with pytest.raises(ValueError, match="no training examples"):
        train_prm(prm, tok, pairs, PRMSettings("bt", steps=1))
    with pytest.raises(ValueError, match="unknown objective"):
        train_prm(prm, tok, recs, PRMSettings("hinge", steps=1))
    with pytest.raises(ValueError, match="2 steps but 1 labels"):
        stepwise_examples([{"prompt": "Q", "completions": ["a", "b"], "labels": [1.0]}])
    assert stepwise_examples(LABELLED[:1], outcome_only=True)[0][2][:2] != [1.0, 1.0]  # NaN: not trained


# ------------------------------------------------------------------------------------------------------ metrics
def test_auc_on_known_inputs():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([0.2, 0.9], [True, False]) == 0.0
    assert np.isnan(auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(s, y) == pytest.approx(brute)


def test_rerank_metrics_on_a_hand_made_example():
    c = lambda a, ok, s: {"answer": a, "correct": ok, "score": s}  # noqa: E731
    groups = [
        # majority says 5 (wrong); the PRM's top pick is 7 (right); score mass: 7 → 1.7, 5 → 0.3
        [c("5", False, 0.1), c("5", False, 0.1), c("5", False, 0.1), c("7", True, 0.9), c("7", True, 0.8)],
        # majority right (3), the PRM prefers a wrong one; weighted vote still right (1.2 vs 0.95)
        [c("3", True, 0.6), c("3", True, 0.6), c("4", False, 0.95)],
        # nobody answers: all selections wrong, oracle too
        [c(None, False, 0.5), c(None, False, 0.4)],
    ]
    assert paired_test([1, 1, 1, 0, 1], [0, 0, 0, 0, 1]) == {"a_only": 3, "b_only": 0, "p_value": 0.25}
    m = rerank_metrics(groups)
    assert m == {
        "rerank_acc": 1 / 3,
        "weighted_vote_acc": 2 / 3,
        "majority_acc": 1 / 3,
        "oracle_acc": 2 / 3,
        "n_prompts": 3,
    }


def test_value_fn_drives_mcts_and_best_of_n():
    from thinktree.search.baselines import best_of_n
    from thinktree.search.mcts import MCTSConfig, search
    from thinktree.search.toy import ArithmeticWorld

    world = ArithmeticWorld()
    prm, tok = tiny_prm()
    vf = PRMValueFn(prm, tok, batch_size=4)
    prompts = [Trajectory("sum to 4:", key=k) for k in range(2)]
    res = search(prompts, world, world.outcome_fn, config=MCTSConfig(num_simulations=6, evaluation="value"),
                 rng=np.random.default_rng(0), value_fn=vf)  # fmt: skip
    assert all(r.budget.value_evals > 0 for r in res)
    bon = best_of_n(prompts, world, world.outcome_fn, n=4, rng=np.random.default_rng(0),
                    answer_selection="best_value", value_fn=vf)  # fmt: skip
    for r in bon:
        leaves = r.tree.terminal_leaves()
        scores = vf([r.tree.trajectory(i) for i in leaves])
        assert r.node == leaves[int(np.argmax(scores))]


# ---------------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import json, sys, torch
from thinktree.rewards.prm import ProcessRewardModel
from thinktree.trainer.algos.prm import PRMSettings, make_accelerator, train_prm
from thinktree.trainer.tiny import build_tiny_model
acc = make_accelerator()
assert acc.num_processes == 2, f"world size {acc.num_processes}, expected 2"
model, tok = build_tiny_model("llama", seed=0, hidden_size=32)
torch.manual_seed(0)
prm = ProcessRewardModel(model)
records = json.loads(sys.argv[1])
fit = train_prm(prm, tok, records, PRMSettings("bce", steps=6, per_device_batch_size=2, learning_rate=3e-3,
                                               log_every=0), accelerator=acc)
head = torch.cat([p.detach().flatten() for p in prm.head.parameters()])
both = acc.gather(head[None])
assert torch.equal(both[0], both[1]), "head weights differ across ranks"
body = torch.cat([p.detach().flatten() for p in prm.backbone.parameters()])
bodies = acc.gather(body[None])
assert torch.equal(bodies[0], bodies[1]), "backbone weights differ across ranks"
if acc.is_main_process:
    json.dump({"world": acc.num_processes, "type": str(acc.distributed_type), "fit": {k: fit[k] for k in ("loss_first", "loss_last", "steps")},
               "moved": float((head - 0).abs().sum())}, open(sys.argv[2], "w"))
"""


ZERO2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  gradient_accumulation_steps: 1
  gradient_clipping: 1.0
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
num_machines: 1
num_processes: 2
mixed_precision: 'no'
"""


def _launch(tmp_path: Path, launch_args: list[str], dist_type: str) -> dict:
    """Run DDP_SCRIPT under ``accelerate launch`` with 2 processes on CPU; the rank-0 result."""
    launcher = Path(sys.executable).parent / "accelerate"
    script, result = tmp_path / "dist_prm.py", tmp_path / "result.json"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if dist_type != "DEEPSPEED":  # ACCELERATE_USE_CPU=true silently turns a DeepSpeed launch into plain DDP
        env["ACCELERATE_USE_CPU"] = "true"
    start = time.perf_counter()
    proc = run_launch(
        lambda: [str(launcher), "launch", *launch_args, "--main_process_port", str(free_port()),
                 str(script), json.dumps(LABELLED), str(result)],
        cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["world"] == 2 and out["fit"]["steps"] == 6 and out["type"].endswith(dist_type), out
    assert out["fit"]["loss_last"] < out["fit"]["loss_first"]
    print(f"2-process run {launch_args[:2]}: {time.perf_counter() - start:.1f} s")
    return out


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    """~20 s; up to ~65 s when the 2 cores are oversubscribed."""
    _launch(tmp_path, ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no"], "MULTI_CPU")  # fmt: skip


@pytest.mark.slow
def test_two_process_deepspeed_zero2_on_cpu(tmp_path):
    """DeepSpeed ZeRO-2 (the first launch on a machine JIT-compiles deepspeed's shm op: minutes)."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero2.yaml"
    config.write_text(ZERO2_CONFIG)
    _launch(tmp_path, ["--config_file", str(config)], "DEEPSPEED")


# ------------------------------------------------------------------------------- log-probability features
def _manual_features(model, tok, prompt: str, steps: tuple[str, ...]) -> list[list[float]]:
    """[step mean, step min, prefix mean, prefix min] of every boundary, from a plain forward pass."""
    enc = StepEncoder(tok)
    ids, ends = enc.encode(prompt, steps)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = [0.0] + [float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(1, len(ids))]
    out = []
    for k, e in enumerate(ends):
        step = lp[ends[k - 1] + 1 : e + 1] if k else []
        pref = lp[ends[0] + 1 : e + 1]
        out.append([
            sum(step) / len(step) if step else 0.0, min(step) if step else 0.0,
            sum(pref) / len(pref) if pref else 0.0, min(pref) if pref else 0.0,
        ])  # fmt: skip
    return out


@pytest.mark.parametrize("arch", ["llama", "mamba"])
def test_logprob_features_match_a_plain_forward_pass(arch):
    model, tok = build_tiny_model(arch, seed=0, hidden_size=32)
    prm = ProcessRewardModel(model, features="hidden+logprob").double().eval()
    steps = ("3*2=6\n", "", "1+6=7\n", "Answer: 7")
    enc = StepEncoder(tok)
    batch = enc.batch([enc.encode("1+3*2=?\n", steps), enc.encode("4-1=?\n", ("4-1=3\n",))])
    with torch.no_grad():
        h = prm.hidden_states(batch["input_ids"], batch["attention_mask"])
        feats = prm.logprob_features(
            h, batch["input_ids"], batch["rows"], batch["cols"], batch["starts"], batch["first"]
        )
    expected = _manual_features(model, tok, "1+3*2=?\n", steps) + _manual_features(
        model, tok, "4-1=?\n", ("4-1=3\n",)
    )
    np.testing.assert_allclose(feats.numpy(), np.array(expected), atol=1e-5)  # Mamba: float32 logits
    assert feats[0].abs().sum() == 0  # the prompt boundary has no step tokens
    # an empty step has no tokens of its own and the same steps so far as the boundary before it
    np.testing.assert_allclose(feats[2, 2:].numpy(), feats[1, 2:].numpy())
    assert feats[2, :2].abs().sum() == 0


def test_logprob_prm_starts_as_policy_confidence_and_round_trips(tmp_path):
    model, tok = build_tiny_model("llama", seed=1, hidden_size=32)
    prm = ProcessRewardModel(model, features="hidden+logprob")
    with torch.no_grad():
        prm.head.weight[0, :32] = 0.0  # leave only the log-probability prior
    vf = PRMValueFn(prm, tok)
    items = [traj("1+3*2=?\n", s) for s in (("3*2=6\n", "1+6=7\n"), ("3*2=9\n", "1+9=10\n"), ("7\n",))]
    conf = [_manual_features(model, tok, t.prompt, tuple(x.text for x in t.steps))[-1][2] for t in items]
    scores = vf(items)
    assert np.argsort(scores).tolist() == np.argsort(conf).tolist()
    save_prm_checkpoint(prm, tok, tmp_path / "prm")
    assert json.loads((tmp_path / "prm" / "prm_config.json").read_text())["features"] == "hidden+logprob"
    loaded, tok2 = load_prm(tmp_path / "prm")
    assert loaded.features == "hidden+logprob"
    np.testing.assert_allclose(PRMValueFn(loaded, tok2)(items), scores, atol=1e-6)
    # a hidden-only head file under a logprob config (and the reverse) is refused with both shapes named
    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(tmp_path / "prm" / HEAD_FILE))
    with pytest.raises(ValueError, match=r"\(1, 32\).*features 'hidden\+logprob'.*expected \(1, 36\)"):
        load_prm(tmp_path / "prm")
    with pytest.raises(ValueError, match="unknown PRM features"):
        ProcessRewardModel(model, features="logits")
    with pytest.raises(ValueError, match="need the batch's 'starts'"):
        b = StepEncoder(tok).batch([StepEncoder(tok).encode("1=?\n", ("1\n",))])
        prm(b["input_ids"], b["attention_mask"], b["rows"], b["cols"])


def test_logprob_prm_trains_head_only_and_keeps_the_backbone():
    model, tok = build_tiny_model("llama", seed=2, hidden_size=32)
    prm = ProcessRewardModel(model, features="hidden+logprob")
    before = {k: v.clone() for k, v in prm.backbone.state_dict().items()}
    fit = train_prm(
        prm,
        tok,
        LABELLED,
        PRMSettings(steps=30, learning_rate=1e-2, per_device_batch_size=4, head_only=True, log_every=0),
    )
    assert fit["loss_last"] < fit["loss_first"]
    for k, v in prm.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_logprob_features_are_chunked_without_changing_scores(monkeypatch):
    import thinktree.rewards.prm as prm_module

    model, tok = build_tiny_model("llama", seed=0, hidden_size=32)
    prm = ProcessRewardModel(model, features="hidden+logprob").double()
    items = [traj("1+3*2=?\n", STEPS), traj("4-1=?\n", ("4-1=3\n",))]
    whole = PRMValueFn(prm, tok).step_scores(items)
    monkeypatch.setattr(
        prm_module, "LOGIT_BUDGET", 2 * len(tok) * 3
    )  # 3 positions per chunk for a batch of 2
    chunked = PRMValueFn(prm, tok, batch_size=2).step_scores(items)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
