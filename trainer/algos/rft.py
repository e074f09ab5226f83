"""Expert iteration: rejection-sampling fine-tuning (RFT) on search-verified paths, on the GRPO engine.

Paper: expert iteration as in ReST-EM (Singh et al., 2023) and rStar-Math's round 1 (Guan et al., 2025): search,
keep the solutions the verifier accepts, fine-tune on them by maximum likelihood, repeat. The records are the top-k
correct root-to-leaf paths of each tree (:func:`thinktree.trainer.signals.traces.rft_records`, ranked like the SFT
traces by mean path Q), every token with weight ``A = 1``; the loss per trained token is the weighted negative
log-likelihood ``-A_t logp_t``, normalised by ``loss_type`` exactly as GRPO's (default ``dapo``: token mean over the
optimiser step's batch).

Why on the engine and not TRL's ``SFTTrainer``: the engine keeps its optimiser moments, LR schedule and RNG from
round to round and through resume (:mod:`thinktree.trainer.rounds`), and trains on the exact token ids the search
generated (no re-tokenisation of the step texts). Departures: no EOS is appended (a path ends where the search
ended it, on its ``Answer:`` step); ``kl_coef > 0`` adds GRPO's k3 penalty to the reference, as in GRPO.

Run: ``RFT(Engine(model, tokenizer, cfg)).train(rft_records(trees, k=2))`` or ``run_algorithm(RFT, ...)``; in a recipe, ``train.algo: rft``.
"""

from __future__ import annotations

import torch

from .batching import Batch
from .engine import ForwardOut
from .grpo import GRPO, LossNorm, normalise

__all__ = ["RFT"]


class RFT(GRPO):
    """Weighted maximum likelihood on verified paths (see module doc); GRPO's plan, checkpoints and resume."""

    name = "rft"
    value_head = False

    def policy_loss(
        self, out: ForwardOut, batch: Batch, norm: LossNorm
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token ``-A_t logp_t`` (no ratio, no clipping); KL, entropy and normalisation as GRPO's."""
        nll = -batch.fields["advantages"] * out.logprobs
        return nll, {"nll": normalise(nll, batch.mask, norm)}
