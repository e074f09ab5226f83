"""PPO over reasoning steps: a value head, GAE over the steps of a chain or tree path, the clipped losses.

Paper: PPO (Schulman et al., 2017) with GAE (Schulman et al., 2016), in the form of the RLHF PPO implementations
(clipped value loss as in cleanrl / TRL's former ``PPOTrainer``). Hand-written because trl 1.16 has no PPO trainer;
kept small by reusing the GRPO machinery (:class:`~.grpo.GRPO`): same policy loss, step plan, checkpoints.

MDP. A record is one root-to-leaf path; its actions are the reasoning steps. State ``s_k`` is the prompt plus the
first ``k`` steps; the reward is the leaf's outcome after the last step and 0 elsewhere; the state after the last step
is terminal (value 0). ``V(s_k)`` is read from the value head at the last token of ``s_k`` (the position whose logits
predict step ``k+1``'s first token). With ``gamma`` and ``gae_lambda`` over steps::

    delta_k = r_k + gamma V(s_{k+1}) - V(s_k),     A_k = delta_k + gamma lambda A_{k+1},     R_k = A_k + V(s_k)

and every token of step ``k+1`` carries ``A_k``. The old values ``V`` and hence ``A``/``R`` are computed once per round
(eval mode, no grad) before the first update, like a rollout's values, and kept with the checkpoints; ``norm_adv``
whitens ``A`` over the round's trained tokens. Losses, normalised over the step's global batch::

    policy:  the GRPO clipped surrogate on A (``loss_type`` normalisation; + kl_coef k3 to the reference if set)
    value:   0.5 max((V - R)^2, (V_old + clip(V - V_old, +-cliprange_value) - R)^2), mean over the step's states
    loss  =  policy + vf_coef * value

Critic: a separate small head (``nn.Linear(hidden, 1)``, zero-initialised) on the SAME backbone
(:class:`~.engine.PolicyWithValue`): no second model in memory; the value loss also shapes the shared backbone (or the
LoRA adapters), scaled by ``vf_coef``. The head is saved as ``value_head.safetensors`` beside the policy.

Records. :func:`ppo_records` adapts a tree: it takes the path records of ``tree_advantages(tree, method="grpo")``
(their ``advantages`` are ignored) and adds ``reward`` (the leaf's outcome, thresholded like the compilers') and
``step_ends`` (cumulative token counts of the path's steps). A record without ``step_ends`` is one single step (a
bandit: ``A = reward - V(prompt)``). Steps inside ``prefix_len`` (context only) are not trained.

Run: ``PPO(Engine(model, tokenizer, cfg, value_head=True)).train(ppo_records(tree) + ...)`` or :func:`train_ppo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from thinktree.search.tree import Tree
from thinktree.trainer.config import TrainConfig
from thinktree.trainer.signals.advantages import tree_advantages

from .batching import Batch
from .engine import Engine, ForwardOut
from .grpo import GRPO, LossNorm, run_algorithm

__all__ = ["PPO", "ppo_records", "step_gae", "train_ppo", "value_loss"]


def ppo_records(tree: Tree | dict | str, *, threshold: float | None = 0.5) -> list[dict]:
    """PPO records of a tree: its root-to-leaf path records plus ``reward`` and ``step_ends`` (see module doc)."""
    records = tree_advantages(tree, method="grpo", threshold=threshold, normalize=False)
    t = (
        tree
        if isinstance(tree, Tree)
        else Tree.from_json(tree)
        if isinstance(tree, str)
        else Tree.from_dict(tree)
    )
    for rec in records:
        raw = t.nodes[rec["node"]].reward
        outcome = 0.0 if raw is None else float(raw)
        rec["reward"] = outcome if threshold is None else float(outcome >= threshold)
        ends, total = [], 0
        for i in t.path(rec["node"])[1:]:
            total += len(t.nodes[i].step.token_ids)
            ends.append(total)
        rec["step_ends"] = ends
    return records


def step_gae(
    values: Sequence[float], reward: float, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """GAE advantages and returns over ``len(values)`` steps with the reward after the last (terminal) step."""
    k = len(values)
    adv, last = [0.0] * k, 0.0
    for i in reversed(range(k)):
        next_v = values[i + 1] if i + 1 < k else 0.0
        delta = (reward if i == k - 1 else 0.0) + gamma * next_v - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    return adv, [a + v for a, v in zip(adv, values)]


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> torch.Tensor:
    """Per-position clipped value loss ``0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2)``."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def _steps(rec: dict) -> list[tuple[int, int]]:
    """``(first token, end)`` of each step of a record's completion."""
    n = len(rec["completion_ids"])
    ends = [int(e) for e in rec.get("step_ends") or [n]]
    if not ends or ends[-1] != n or any(b <= a for a, b in zip([0, *ends], ends)):
        raise ValueError(f"record key={rec.get('key')}: step_ends {ends} do not partition {n} tokens")
    return list(zip([0, *ends[:-1]], ends))


class PPO(GRPO):
    """PPO trainer: GRPO's loop and policy loss, plus GAE targets and the value loss (see module doc)."""

    name = "ppo"
    value_head = True

    def precompute(self, records: Sequence[dict]) -> dict[str, list[list[float]]]:
        """Old values at step starts, GAE advantages (per token) and returns; plus reference logprobs if needed."""
        extra = super().precompute(records)
        if self.engine.wrapper.v_head is None:
            raise ValueError("PPO needs Engine(..., value_head=True)")
        old = self.map_records(records, lambda b: self.engine.forward(b, values=True, train=False).values)
        adv_tok, ret_tok, old_tok, vmask_tok = [], [], [], []
        for rec, v in zip(records, old):
            if "reward" not in rec:
                raise ValueError(
                    f"record key={rec.get('key')} has no 'reward': build PPO records with ppo_records()"
                )
            steps = _steps(rec)
            mask = rec.get("loss_mask") or [1] * len(v)
            starts = [a for a, _ in steps]
            adv, ret = step_gae(
                [v[a] for a in starts], float(rec["reward"]), self.cfg.gamma, self.cfg.gae_lambda
            )
            a_tok, r_tok, o_tok, m_tok = [0.0] * len(v), [0.0] * len(v), [0.0] * len(v), [0.0] * len(v)
            for (a, b), adv_k, ret_k in zip(steps, adv, ret):
                a_tok[a:b] = [adv_k] * (b - a)
                r_tok[a], o_tok[a], m_tok[a] = ret_k, v[a], float(mask[a])
            adv_tok.append(a_tok)
            ret_tok.append(r_tok)
            old_tok.append(o_tok)
            vmask_tok.append(m_tok)
        if self.cfg.norm_adv:
            adv_tok = _whiten(adv_tok, [r.get("loss_mask") or [1] * len(a) for r, a in zip(records, adv_tok)])
        return {
            **extra,
            "advantages": adv_tok,
            "returns": ret_tok,
            "old_values": old_tok,
            "value_mask": vmask_tok,
        }

    def step(
        self, records: Sequence[dict], chunk: Sequence[int], extra: dict, first: bool
    ) -> dict[str, float]:
        self._n_values = max(sum(sum(extra["value_mask"][r]) for r in chunk), 1.0)
        return super().step(records, chunk, extra, first)

    def loss(
        self, out: ForwardOut, batch: Batch, norm: LossNorm, first: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pg, parts = super().loss(out, batch, norm, first)
        f = batch.fields
        vl = value_loss(out.values, f["old_values"], f["returns"], self.cfg.cliprange_value)
        vmean = (vl * f["value_mask"]).sum() / self._n_values
        parts["value_loss"] = vmean.detach()
        return pg + self.cfg.vf_coef * vmean, parts


def _whiten(adv: list[list[float]], masks: list[list[int]]) -> list[list[float]]:
    """Whiten over the trained, finite entries (a NaN reward stays NaN in its own record only: that step skips)."""
    vals = [a for row, m in zip(adv, masks) for a, k in zip(row, m) if k and math.isfinite(a)]
    if len(vals) < 2:
        return adv
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((a - mean) ** 2 for a in vals) / len(vals))
    return [[(a - mean) / (std + 1e-8) if k else 0.0 for a, k in zip(row, m)] for row, m in zip(adv, masks)]


def train_ppo(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict],
    cfg: TrainConfig,
    *,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    on_step_end: Sequence[Callable[[Engine, dict[str, float]], None]] = (),
    engine: Engine | None = None,
) -> tuple[Engine, list[dict[str, float]]]:
    """Build (or reuse) an :class:`Engine` with a value head and run :meth:`PPO.train`."""
    return run_algorithm(PPO, model, tokenizer, records, cfg, seed=seed, checkpoint_dir=checkpoint_dir,
                         on_step_end=on_step_end, engine=engine)  # fmt: skip
