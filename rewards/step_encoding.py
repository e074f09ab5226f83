"""Token ids and step-boundary positions of (prompt, step texts) for the process reward model.

:class:`StepEncoder` tokenizes a prompt and each step's TEXT separately (``add_special_tokens=False``), prepends BOS
when the tokenizer adds one by default, and records where every step ends, so one forward pass of a causal backbone
can be read at every step boundary (:class:`thinktree.rewards.prm.ProcessRewardModel`). Batches are right-padded
(real tokens keep their positions and never see padding). See :mod:`thinktree.rewards.prm` for the choices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["StepEncoder", "prompt_steps"]


class StepEncoder:
    """Token ids and step-boundary positions of (prompt, step texts), with memoised tokenization."""

    def __init__(self, tokenizer: Any, context: int | None = None, memo_limit: int = 200_000) -> None:
        self.tokenizer = tokenizer
        self.context = context
        self.pad_id = next(
            (int(x) for x in (tokenizer.pad_token_id, tokenizer.eos_token_id) if x is not None), 0
        )
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos = int(bos) if bos is not None and probe and probe[0] == bos else None
        self._memo: dict[str, list[int]] = {}
        self._limit = memo_limit

    def _ids(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
            if len(self._memo) >= self._limit:
                self._memo.clear()
            self._memo[text] = ids
        return ids

    def encode(self, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
        """``(ids, ends)``: ``ends[0]`` is the prompt's last token, ``ends[k]`` the last token of step ``k``."""
        ids = list(self._ids(prompt))
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        ends = [len(ids) - 1]
        for text in steps:
            ids.extend(self._ids(text))
            ends.append(len(ids) - 1)
        if not ids:
            raise ValueError("empty prompt and steps and no BOS token: nothing to score")
        if ends[0] < 0:  # empty prompt without BOS: no position before the first token; read the first one
            ends = [max(e, 0) for e in ends]
        if self.context is not None and len(ids) > self.context:
            raise ValueError(f"trajectory of {len(ids)} tokens exceeds the backbone context ({self.context})")
        return ids, ends

    def batch(
        self, encoded: Sequence[tuple[list[int], list[int]] | tuple[list[int], list[int], list[int]]]
    ) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` plus flat ``rows``/``cols`` of every boundary, the first
        token of each boundary's step (``starts``) and of its row's first step (``first``).

        Items are :meth:`encode`'s ``(ids, ends)``, or ``(ids, ends, all_ends)`` where ``ends`` is a suffix of
        the boundaries ``all_ends`` (what ``encode`` returned) to read, so the spans stay those of the whole
        trajectory.
        """
        width = max(len(item[0]) for item in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        starts: list[int] = []
        first: list[int] = []
        for r, (ids, ends, *rest) in enumerate(encoded):
            all_ends = rest[0] if rest else ends
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, : len(ids)] = 1
            rows += [r] * len(ends)
            cols += ends
            off = len(all_ends) - len(ends)
            if off < 0 or list(all_ends[off:]) != list(ends):
                raise ValueError(f"boundaries {ends} are not a suffix of the trajectory's {all_ends}")
            starts += [all_ends[off + j - 1] + 1 if off + j else e + 1 for j, e in enumerate(ends)]
            first += [all_ends[0] + 1] * len(ends)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "rows": torch.tensor(rows, dtype=torch.long),
            "cols": torch.tensor(cols, dtype=torch.long),
            "starts": torch.tensor(starts, dtype=torch.long),
            "first": torch.tensor(first, dtype=torch.long),
        }


def prompt_steps(item: Any) -> tuple[str, list[str]]:
    """(prompt, step texts) of a Trajectory-like object (``.prompt``, ``.steps[i].text``) or a TRL stepwise
    record (``{"prompt", "completions"}``)."""
    if isinstance(item, Mapping):
        return item["prompt"], [str(s) for s in item["completions"]]
    return item.prompt, [s.text for s in item.steps]
