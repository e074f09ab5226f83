"""Deterministic toy worlds: fake :class:`StepProposer` s (no model) for tests and benchmarks.

Each world is a proposer (``propose``; a ``stats`` dict of counters like a real backend) plus its verifier
(``outcome_fn``), a value function (``value_fn``) and an answer extractor (``answer_fn``). A proposal depends only
on (prefix, seed), as the protocol requires. Token ids are the step's characters, so tokens = ``len(text)``; every
token's logprob is ``log(prior)``, so ``exp(mean(logprobs)) == prior``.

* :class:`BanditWorld` — a k-armed bandit: the root's children are k arms with fixed rewards.
* :class:`ArithmeticWorld` — steps add digits; reward 1 iff the sum after ``depth`` steps hits ``target``. The
  prior favours large digits, so greedy-by-prior overshoots while a search finds the target.
* :class:`RandomTreeWorld` — a random (but seed-deterministic) tree with duplicates, EOS and hashed rewards, for
  property tests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from thinktree.search.types import StepRecord, Trajectory

__all__ = ["make_step", "ToyWorld", "BanditWorld", "ArithmeticWorld", "RandomTreeWorld", "NeverEndingWorld"]


def make_step(text: str, prior: float = 1.0, eos: bool = False) -> StepRecord:
    """A StepRecord whose tokens are the characters of ``text``, each with logprob ``log(prior)``."""
    logprob = math.log(prior) if prior > 0 else -1e9
    return StepRecord(
        text=text,
        token_ids=tuple(ord(c) for c in text),
        logprobs=(logprob,) * len(text),
        prior=prior,
        eos=eos,
    )


def _hash(*parts: object) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


class ToyWorld:
    """Base class: counts calls like a backend would (``stats``) and delegates to :meth:`children`."""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {"calls": 0, "forward_passes": 0, "generated_tokens": 0}

    def children(self, prefix: Trajectory, num_children: int, rng: np.random.Generator) -> list[StepRecord]:
        raise NotImplementedError

    def propose(
        self, prefixes: Sequence[Trajectory], num_children: int, seeds: Sequence[int]
    ) -> list[list[StepRecord]]:
        self.stats["calls"] += 1
        out = []
        for prefix, seed in zip(prefixes, seeds):
            rng = np.random.default_rng([int(seed), _hash(prefix.prompt, prefix.completion)])
            steps = self.children(prefix, num_children, rng)
            self.stats["forward_passes"] += max(len(s.token_ids) for s in steps)
            self.stats["generated_tokens"] += sum(len(s.token_ids) for s in steps)
            out.append(steps)
        return out

    def outcome_fn(self, trajectories: Sequence[Trajectory]) -> list[float | None]:
        return [self.reward(t) for t in trajectories]

    def value_fn(self, trajectories: Sequence[Trajectory]) -> list[float]:
        return [self.value(t) for t in trajectories]

    def reward(self, trajectory: Trajectory) -> float | None:
        raise NotImplementedError

    def value(self, trajectory: Trajectory) -> float:
        raise NotImplementedError

    def answer_fn(self, completion: str) -> str | None:
        """The text after the last '=' (None if there is none)."""
        return completion.rsplit("=", 1)[1].strip() if "=" in completion else None


class BanditWorld(ToyWorld):
    """A k-armed bandit with fixed rewards: the root's children are the arms ``"arm{i}"`` (prior ``priors[i]``);
    an arm's only continuation is the EOS step ``"={i}"`` with reward ``rewards[i]``.

    Every value in arm i's subtree is ``rewards[i]`` (``value_fn`` returns it at the arm and below, and
    ``root_value`` at the root), so Q(arm i) = rewards[i] exactly and the root behaves as a flat bandit whose
    visit counts have a closed form. With ``num_children == k`` the root gets all arms in order; otherwise
    ``num_children`` arms are sampled i.i.d. from the priors (rollouts: ``num_children=1``).
    """

    def __init__(
        self, rewards: Sequence[float], priors: Sequence[float] | None = None, root_value: float = 0.5
    ) -> None:
        super().__init__()
        self.rewards = [float(r) for r in rewards]
        k = len(self.rewards)
        p = [1.0 / k] * k if priors is None else [float(x) for x in priors]
        self.priors = [x / sum(p) for x in p]
        self.root_value = root_value

    def children(self, prefix: Trajectory, num_children: int, rng: np.random.Generator) -> list[StepRecord]:
        if prefix.steps:
            arm = prefix.steps[0].text[3:]
            return [make_step(f"={arm}", 1.0, eos=True)] * num_children
        k = len(self.rewards)
        picks = range(k) if num_children == k else rng.choice(k, size=num_children, p=self.priors)
        return [make_step(f"arm{int(i)}", self.priors[int(i)]) for i in picks]

    def value(self, trajectory: Trajectory) -> float:
        if not trajectory.steps:
            return self.root_value
        return self.rewards[int(trajectory.steps[0].text[3:])]

    def reward(self, trajectory: Trajectory) -> float | None:
        return self.value(trajectory) if trajectory.done else None


class ArithmeticWorld(ToyWorld):
    """Steps ``"+d"`` add a digit from ``digits``; the ``depth``-th step is ``"+d=S"`` (EOS) with S the sum.

    Reward 1 iff S == target. Priors ∝ d + 1: large digits are likely, so the greedy chain (``greedy=True``:
    every sample is the top-prior digit, i.e. temperature 0) overshoots. With ``num_children == len(digits)``
    every digit is proposed once (in order); otherwise ``num_children`` digits are sampled from the priors.
    ``value_fn`` is 1 if the target is still reachable from the prefix, else 0.
    """

    def __init__(
        self, digits: Sequence[int] = (0, 1, 2, 3), depth: int = 3, target: int = 4, greedy: bool = False
    ) -> None:
        super().__init__()
        self.digits = [int(d) for d in digits]
        self.depth, self.target, self.greedy = depth, target, greedy
        weights = [d + 1 for d in self.digits]
        self.priors = [w / sum(weights) for w in weights]

    @staticmethod
    def total(trajectory: Trajectory) -> int:
        return sum(int(s.text[1:].split("=")[0]) for s in trajectory.steps)

    def children(self, prefix: Trajectory, num_children: int, rng: np.random.Generator) -> list[StepRecord]:
        if self.greedy:
            picks = [int(np.argmax(self.priors))] * num_children
        elif num_children == len(self.digits):
            picks = list(range(num_children))
        else:
            picks = [int(i) for i in rng.choice(len(self.digits), size=num_children, p=self.priors)]
        last = len(prefix.steps) + 1 >= self.depth
        out = []
        for i in picks:
            d = self.digits[i]
            text = f"+{d}={self.total(prefix) + d}" if last else f"+{d}"
            out.append(make_step(text, self.priors[i], eos=last))
        return out

    def reward(self, trajectory: Trajectory) -> float | None:
        return float(trajectory.done and self.total(trajectory) == self.target)

    def value(self, trajectory: Trajectory) -> float:
        left = self.target - self.total(trajectory)
        steps_left = self.depth - len(trajectory.steps)
        return float(min(self.digits) * steps_left <= left <= max(self.digits) * steps_left)


class RandomTreeWorld(ToyWorld):
    """A random tree fixed by ``seed``: steps ``"w{j}"`` from a ``vocab``-word vocabulary (duplicates likely),
    1..``max_tokens`` tokens, random priors; EOS with probability ``eos_prob`` (steps ``"w{j}=j"``).

    Rewards and values are hashes of the completion mapped to [0, 1] (``binary``: rewards in {0, 1}).
    """

    def __init__(
        self, seed: int = 0, vocab: int = 4, eos_prob: float = 0.3, max_tokens: int = 3, binary: bool = False
    ) -> None:
        super().__init__()
        self.seed, self.vocab, self.eos_prob = seed, vocab, eos_prob
        self.max_tokens, self.binary = max_tokens, binary

    def children(self, prefix: Trajectory, num_children: int, rng: np.random.Generator) -> list[StepRecord]:
        rng = np.random.default_rng([self.seed, int(rng.integers(0, 2**31))])
        out = []
        for _ in range(num_children):
            j = int(rng.integers(self.vocab))
            eos = bool(rng.random() < self.eos_prob)
            n = int(rng.integers(1, self.max_tokens + 1))
            logprobs = tuple(float(x) for x in -rng.exponential(1.0, size=n))
            text = f" w{j}={j}" if eos else f" w{j}"
            ids = tuple(int(x) for x in rng.integers(0, 1000, size=n))
            prior = math.exp(sum(logprobs) / n)
            out.append(StepRecord(text=text, token_ids=ids, logprobs=logprobs, prior=prior, eos=eos))
        return out

    def reward(self, trajectory: Trajectory) -> float | None:
        h = _hash("reward", self.seed, trajectory.completion) % 101
        return float(h % 2) if self.binary else h / 100

    def value(self, trajectory: Trajectory) -> float:
        return (_hash("value", self.seed, trajectory.completion) % 101) / 100


class NeverEndingWorld(ToyWorld):
    """A proposer that never emits EOS (each step ``" x"``): only ``max_depth`` bounds a search."""

    def children(self, prefix: Trajectory, num_children: int, rng: np.random.Generator) -> list[StepRecord]:
        return [make_step(f" x{int(rng.integers(3))}", 0.5) for _ in range(num_children)]

    def reward(self, trajectory: Trajectory) -> float | None:
        return None

    def value(self, trajectory: Trajectory) -> float:
        return 0.5
