"""Learning machinery: expert-iteration records and loss, process-checked rewards, the random-reward control,
collapse checks, and the one engine whose optimiser / schedule state carries across rounds and through resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinktree.rewards import get_task
from thinktree.search.mcts import backup
from thinktree.search.tree import ROOT, Tree
from thinktree.search.types import StepRecord, Trajectory
from thinktree.trainer.algos.engine import Engine
from thinktree.trainer.algos.grpo import LossNorm
from thinktree.trainer.algos.rft import RFT
from thinktree.trainer.config import ConfigError, TrainConfig, load_config
from thinktree.trainer.learning import collapse_report, process_checked, randomise_rewards
from thinktree.trainer.models import load_policy
from thinktree.trainer.rounds import run_train, weights_digest
from thinktree.trainer.signals import rft_records


def _step(text: str, ids: tuple[int, ...], eos: bool = False) -> StepRecord:
    return StepRecord(text=text, token_ids=ids, logprobs=tuple(-0.5 for _ in ids), prior=0.5, eos=eos)


def _tree() -> Tree:
    """root ─ a(2 tok) ─ c(1 tok, leaf, reward 1)
                      └ d(1 tok, leaf, reward 0)
            └ b(1 tok, leaf, reward 1)
    Q (mean backup of the leaves below): a = 0.5, b = 1, c = 1, d = 0."""
    t = Tree.from_prompt(Trajectory("P", key=3))
    a = t.add_child(ROOT, _step("a", (1, 2)), 0.5, False)
    b = t.add_child(ROOT, _step("b", (3,), eos=True), 0.5, True)
    c = t.add_child(a, _step("c", (4,), eos=True), 0.5, True)
    d = t.add_child(a, _step("d", (5,), eos=True), 0.5, True)
    for leaf, reward in ((c, 1.0), (d, 0.0), (b, 1.0)):
        t.nodes[leaf].reward = reward
        backup(t, t.path(leaf), reward)
    return t


def test_rft_records_are_the_top_k_correct_paths_with_unit_weight():
    t = _tree()
    # ranked by mean path Q: b (Q 1) before a→c (mean of 0.5 and 1 = 0.75); d is wrong and never kept
    one = rft_records([t], k=1)
    assert [r["node"] for r in one] == [2] and one[0]["completion_ids"] == [3]
    two = rft_records([t], k=2)
    assert [r["node"] for r in two] == [2, 3]
    assert two[1]["completion_ids"] == [1, 2, 4] and two[1]["advantages"] == [1.0, 1.0, 1.0]
    assert (
        two[1]["loss_mask"] == [1, 1, 1]
        and two[1]["old_logprobs"] == [-0.5] * 3
        and two[1]["method"] == "rft"
    )


def test_rft_loss_is_token_mean_nll():
    model, tok = load_policy("tiny:llama", seed=0)
    engine = Engine(model, tok, TrainConfig(per_device_batch_size=2, learning_rate=1e-3, steps=1))
    records = rft_records([_tree()], k=2)
    batch = engine.collate(records, [0, 1])
    out = engine.forward(batch, train=False)
    norm = LossNorm.of(records, [0, 1], "dapo")
    loss, parts = RFT(engine).loss(out, batch, norm, first=True)
    # dapo: sum over the 1 + 3 trained tokens of -logp, divided by 4 tokens
    expected = -(out.logprobs * batch.mask).sum() / 4
    assert torch.allclose(loss, expected) and torch.allclose(parts["nll"], expected)


def test_countdown_and_arith_process_checks():
    cd = get_task("countdown")
    assert cd.check_steps(["7*3=21\n", "21+5=26\n", "Answer: 7*3+5"], [3, 5, 7])
    assert not cd.check_steps(["7*3=21\n", "21+7=28\n"], [3, 5, 7])  # 7 used twice
    assert not cd.check_steps(["7*3=22\n"], [3, 5, 7])  # wrong product
    assert not cd.check_steps(["8/3=2\n"], [3, 8])  # inexact division
    assert cd.check_steps(["9-4=5\n", "5*5=25\n"], "4 5 9")  # the intermediate 5 and the given 5

    def outcome(trajs):
        return [1.0] * len(trajs)

    checked = process_checked(outcome, cd)
    good = Trajectory("P", (_step("7*3=21\n", (1,)), _step("Answer: 7*3", (2,))), meta={"numbers": [3, 7]})
    lucky = Trajectory("P", (_step("7*3=20\n", (1,)), _step("Answer: 7*3", (2,))), meta={"numbers": [3, 7]})
    assert checked([good, lucky]) == [1.0, 0.0]
    arith = process_checked(outcome, get_task("arith"))
    ok = Trajectory("P", (_step("2+3=5\n", (1,)),))
    bad = Trajectory("P", (_step("2+3=6\n", (1,)),))
    assert arith([ok, bad]) == [1.0, 0.0]


def test_random_reward_control_keeps_the_positive_rate_and_is_seeded():
    trees = []
    for _ in range(50):
        t = _tree()
        trees.append(t)
    flipped, p = randomise_rewards(trees, np.random.default_rng(0))
    assert p == pytest.approx(2 / 3)  # two of the three leaves of each tree are correct
    rewards = [t.nodes[i].reward for t in flipped for i in t.terminal_leaves()]
    assert set(rewards) <= {0.0, 1.0} and abs(np.mean(rewards) - 2 / 3) < 0.1
    again, _ = randomise_rewards(trees, np.random.default_rng(0))
    assert [t.to_json() for t in again] == [t.to_json() for t in flipped]
    assert [t.nodes[2].reward for t in trees] == [1.0] * 50  # the inputs are untouched


def test_collapse_report_names_each_condition():
    t = _tree()
    zero = [{"advantages": [0.0, 0.0], "loss_mask": [1, 1]}]
    assert collapse_report([t], zero, [], entropy_floor=0.0, kl_ceiling=1.0) == [
        "no trained token has a non-zero advantage"
    ]
    wrong = Tree.from_dict(t.to_dict())
    for i in wrong.terminal_leaves():
        wrong.nodes[i].reward = 0.0
    reasons = collapse_report([wrong], [], [{"train/entropy": 0.01, "train/approx_kl": 2.0}],
                              entropy_floor=0.05, kl_ceiling=0.5)  # fmt: skip
    assert reasons[0] == "all 1 trees have only wrong leaves"
    assert "entropy 0.0100 < train.entropy_floor=0.05" in reasons[1] and "approx-KL 2.000" in reasons[2]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.control=coin", "train.control"),
        ("train.on_collapse=halt", "train.on_collapse"),
        ("train.loss_type=foo", "train.loss_type"),
        ("train.learning_rate=.nan", "train.learning_rate"),
        ("train.per_device_batch_size=0", "train.per_device_batch_size"),
    ],
)
def test_train_section_is_validated_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


TINY = [
    "model.policy=tiny:llama",
    "task.name=arith",
    "task.kwargs={ops: [1, 1], digits: 1}",
    "task.train_size=200",
    "task.eval_size=4",
    "search.num_simulations=6",
    "search.num_children=3",
    "search.in_flight=2",
    "search.max_depth=3",
    "search.max_step_tokens=10",
    "output.report_to=[]",
    "rounds.num_rounds=2",
    "rounds.prompts_per_round=8",
    "train.algo=rft",
    "train.steps=3",
    "train.per_device_batch_size=4",
    "train.learning_rate=1e-3",
    "train.lr_scheduler_type=cosine",
    "train.warmup_steps=2",
    "rounds.traces_per_tree=2",
    "eval.methods=[greedy]",
    "eval.health=false",
]


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> list[str]:
    """TINY from a shared warm start (150 SFT steps: some of its MCTS leaves are correct, some wrong)."""
    out = tmp_path_factory.mktemp("warm")
    ws = ["rounds.num_rounds=0", "rounds.warm_start.algo=sft", "rounds.warm_start.steps=150",
          "rounds.warm_start.learning_rate=5e-3", "rounds.warm_start.per_device_batch_size=16", f"output.dir={out}"]  # fmt: skip
    run_train(load_config(None, TINY + ws))
    return TINY + [f"model.policy={out / 'warm_start' / 'checkpoint'}"]


def test_engine_state_carries_across_rounds_and_through_resume(warm, tmp_path, monkeypatch):
    """Two RFT rounds of 3 steps: one optimiser and one cosine schedule over 6 steps; a run killed before round 2
    and resumed ends with the same weights as the uninterrupted run."""
    from thinktree.trainer import rounds

    whole = run_train(load_config(None, warm + [f"output.dir={tmp_path / 'whole'}"]))
    row1, row2 = whole["rounds"][1], whole["rounds"][2]
    assert row1["optimizer_steps"] == 3 and row2["optimizer_steps"] == 6  # one engine, steps counted on
    lrs = [json.loads(line)["train/learning_rate"] for r in (1, 2)
           for line in (tmp_path / "whole" / f"round-0{r}" / "train_metrics.jsonl").read_text().splitlines()]  # fmt: skip
    # warm-up 2 steps then cosine over the 4 remaining: 0, .5, 1, cos-decay..., never restarting at round 2
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and lrs[3] < lrs[2] and lrs[5] < lrs[4] < lrs[3]
    assert not (tmp_path / "whole" / "round-01" / "trainer").exists()  # superseded training state pruned

    real_search, calls = rounds.search_stage, {"n": 0}

    def dies_at_round_2(run, prompts, rdir, seed):
        if rdir.name == "round-02" and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt("killed")
        return real_search(run, prompts, rdir, seed)

    monkeypatch.setattr(rounds, "search_stage", dies_at_round_2)
    cfg = load_config(None, warm + [f"output.dir={tmp_path / 'killed'}"])
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg)
    resumed = run_train(cfg)
    assert resumed["rounds"][2]["optimizer_steps"] == 6
    a, _ = load_policy(str(tmp_path / "whole" / "round-02" / "checkpoint"))
    b, _ = load_policy(str(tmp_path / "killed" / "round-02" / "checkpoint"))
    assert weights_digest(a) == weights_digest(b)
    assert resumed["accuracy_after"] == whole["accuracy_after"]


def test_controls_run_through_the_loop(warm, tmp_path):
    base = warm + ["rounds.num_rounds=1"]
    zero = run_train(load_config(None, base + ["train.control=zero_update", f"output.dir={tmp_path / 'z'}"]))
    assert zero["rounds"][1]["control"] == "zero_update" and "optimizer_steps" not in zero["rounds"][1]
    assert zero["accuracy_after"] == zero["accuracy_before"]
    rand = run_train(
        load_config(None, base + ["train.control=random_reward", f"output.dir={tmp_path / 'r'}"])
    )
    assert rand["rounds"][1]["optimizer_steps"] == 3


def test_decaying_schedule_needs_a_step_count(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=0", f"output.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.steps > 0"):
        run_train(cfg)


def test_on_collapse_stop_ends_the_run_and_the_same_command_resumes(warm, tmp_path, caplog):
    # an entropy floor no policy meets: round 1 "cannot teach"
    cfg = load_config(
        None, warm + ["train.on_collapse=stop", "train.entropy_floor=100", f"output.dir={tmp_path}"]
    )
    first = run_train(cfg)
    assert [r["round"] for r in first["rounds"]] == [0, 1]
    assert "train.entropy_floor=100" in first["rounds"][1]["collapse"][0]
    assert "stopping (train.on_collapse=stop; the same command resumes with round 2)" in caplog.text
    again = run_train(cfg)
    assert [r["round"] for r in again["rounds"]] == [0, 1, 2]


def test_engine_warm_start_continues_into_the_rounds(warm, tmp_path):
    """warm_start.algo=engine: 20 likelihood steps on 40 worked solutions, then round 1's 3 RFT steps on the same
    optimiser; warmup_stable_decay is flat through the warm start and decays over the rounds' steps only."""
    cfg = load_config(None, warm + [
        "rounds.num_rounds=1", "rounds.warm_start.algo=engine", "rounds.warm_start.steps=20",
        "rounds.warm_start.examples=40", "rounds.warm_start.learning_rate=1e-4", "train.warmup_steps=0",
        "train.lr_scheduler_type=warmup_stable_decay", f"output.dir={tmp_path}",
    ])  # fmt: skip
    summary = run_train(cfg)
    assert summary["warm_start"]["examples"] == 40
    assert summary["rounds"][1]["optimizer_steps"] == 23
    lrs = [json.loads(line)["train/learning_rate"]
           for line in (tmp_path / "round-01" / "train_metrics.jsonl").read_text().splitlines()]  # fmt: skip
    # 23 steps, decay over the last 3 (cosine): the round's peak 1e-3 at its first step, then 1e-3·(1+cos(π/3))/2 …
    assert lrs == pytest.approx([1e-3, 1e-3 * 0.75, 1e-3 * 0.25])
    assert not (tmp_path / "warm_start" / "trainer").exists()  # superseded by round 1's training state


def test_pi_prime_targets_join_the_round_records(warm, tmp_path):
    """train.pi_prime_coef > 0: the round's GRPO records gain Gumbel MuZero improved-policy records."""
    cfg = load_config(None, warm + ["rounds.num_rounds=1", "train.algo=grpo", "train.lr_scheduler_type=constant",
                                    "train.pi_prime_coef=0.5", f"output.dir={tmp_path}"])  # fmt: skip
    run_train(cfg)
    records = [
        json.loads(line) for line in (tmp_path / "round-01" / "signals.jsonl").read_text().splitlines()
    ]
    pi = [r for r in records if r["method"] == "improved_policy"]
    assert pi and {r["method"] for r in records} == {"treerl", "improved_policy"}
    for r in pi:  # each trains one step's tokens with 0.5·(π′ − p)
        trained = [a for a, m in zip(r["advantages"], r["loss_mask"]) if m]
        assert trained and all(a == pytest.approx(0.5 * (r["target"] - r["prior"])) for a in trained)


def test_eval_every_skips_evaluation_between_marks_but_not_the_last_round(warm, tmp_path):
    cfg = load_config(None, warm + ["rounds.num_rounds=3", "rounds.eval_every=2", "train.steps=1",
                                    f"output.dir={tmp_path}"])  # fmt: skip
    rows = run_train(cfg)["rounds"]
    # rounds 0 (start), 2 (a mark) and 3 (the last) are evaluated; round 1 records only its search and training
    assert [("eval" in r) for r in rows] == [True, False, True, True]
    assert rows[1]["optimizer_steps"] == 1 and "generated_tokens" in rows[1]
    assert (
        not (tmp_path / "round-01" / "eval.json").exists() and (tmp_path / "round-02" / "eval.json").exists()
    )
