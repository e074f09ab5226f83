"""SFT traces from search trees (rStar-Math's policy data selection).

For each tree, the correct root-to-terminal-leaf paths (leaf outcome ``>= threshold``; an ungraded leaf, reward
``None``, counts as 0.0) are ranked by the mean Q of the path's step nodes (the root excluded: it is shared),
ties broken by the higher leaf reward, then by the lower leaf index; paths whose completion text equals a
better-ranked one are dropped; the top ``k`` remain. This is rStar-Math (Guan et al., 2025), which keeps the top-2
correct trajectories by average Q per problem. Departure: rStar-Math's Q comes from its terminal-guided
annotation and PPM; here it is whatever the search backed up (``Tree.q``).

Records are TRL's prompt-completion format plus bookkeeping: ``{"prompt": tree.prompt, "completion": the step
texts concatenated (no EOS: TRL's SFTTrainer appends it), "key": tree.key, "node": the leaf, "q": mean path Q,
"reward": the leaf's reward}``.
"""

from __future__ import annotations

from collections.abc import Iterable

from thinktree.search.tree import Tree
from thinktree.trainer.signals.advantages import path_record

__all__ = ["sft_traces", "path_q", "rft_records"]


def path_q(tree: Tree, node: int) -> float:
    """Mean ``Tree.q`` of the non-root nodes on the path root → ``node`` (0.0 for the root)."""
    steps = tree.path(node)[1:]
    return sum(tree.q(i) for i in steps) / len(steps) if steps else 0.0


def sft_traces(trees: Iterable[Tree], k: int = 1, threshold: float = 0.5) -> list[dict]:
    """The top-``k`` distinct correct paths of every tree, best first (see module doc)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out: list[dict] = []
    for tree in trees:
        ranked = []
        for leaf in tree.terminal_leaves():
            reward = tree.nodes[leaf].reward
            r = 0.0 if reward is None else float(reward)
            if r >= threshold:
                ranked.append((-path_q(tree, leaf), -r, leaf))
        ranked.sort()
        seen: set[str] = set()
        kept = 0
        for neg_q, neg_r, leaf in ranked:
            completion = tree.trajectory(leaf).completion
            if completion in seen:
                continue
            seen.add(completion)
            out.append(
                {
                    "prompt": tree.prompt,
                    "completion": completion,
                    "key": tree.key,
                    "node": leaf,
                    "q": -neg_q,
                    "reward": -neg_r,
                }
            )
            kept += 1
            if kept == k:
                break
    return out


def rft_records(trees: Iterable[Tree], k: int = 1, threshold: float = 0.5) -> list[dict]:
    """Expert-iteration records: the :func:`sft_traces` paths as token records (advantage 1 on every token).

    Same format as :func:`~thinktree.trainer.signals.advantages.tree_advantages`' path records (``method: "rft"``),
    so :class:`~thinktree.trainer.algos.rft.RFT` trains on the exact token ids the search generated.
    """
    out: list[dict] = []
    for tree in trees:
        for trace in sft_traces([tree], k=k, threshold=threshold):
            out.append(path_record(tree, trace["node"], "rft", lambda _i: 1.0))
    return out
