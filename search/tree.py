"""The search tree: a flat list of nodes indexed by creation order (mctx-style ``Tree``).

Node ``ROOT`` (0) is the prompt; every other node is one reasoning step (:class:`StepRecord`) appended to its
parent's trajectory. Statistics follow AlphaZero: ``visits(n) = evaluations(n) + sum(visits(children))`` and
``q(n)`` is the mean (or, with ``backup="max"``, the max) of the leaf values backed up through ``n``.

Trees serialise to canonical JSON (sorted keys, no whitespace); floats round-trip exactly, so
``Tree.from_json(t.to_json()).to_json() == t.to_json()`` and two searches with the same seed give identical bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from thinktree.search.types import StepRecord, Trajectory

__all__ = ["ROOT", "NO_PARENT", "FORMAT_VERSION", "Node", "Tree"]

ROOT = 0
"""Index of the root node (the prompt)."""
NO_PARENT = -1
"""The root's ``parent``."""
FORMAT_VERSION = 1
"""Version of the JSON layout written by :meth:`Tree.to_dict`."""


@dataclass(slots=True)
class Node:
    """One node of a :class:`Tree`. All statistics are plain Python numbers so the node serialises exactly."""

    parent: int
    """Index of the parent node; ``NO_PARENT`` for the root."""
    depth: int
    """Number of steps from the root (root = 0)."""
    step: StepRecord | None = None
    """The reasoning step this node appends to its parent's trajectory; ``None`` for the root."""
    prior: float = 1.0
    """Policy prior of this child, normalised over its siblings (duplicate step texts merged, priors summed)."""
    children: list[int] = field(default_factory=list)
    """Indices of the children, in creation order; empty until the node is expanded."""
    visits: int = 0
    """N(n): own evaluations plus the visits of all children."""
    evaluations: int = 0
    """How many times this node itself was the evaluated leaf of a simulation."""
    value_sum: float = 0.0
    """Sum of the leaf values backed up through this node (mean backup: Q = value_sum / visits)."""
    max_value: float | None = None
    """Largest leaf value backed up through this node (max backup: Q = max_value)."""
    virtual_loss: int = 0
    """Number of in-flight simulations whose path goes through this node (0 between waves)."""
    terminal: bool = False
    """The trajectory is finished (the step emitted EOS, or the node is at ``max_depth``); never expanded."""
    reward: float | None = None
    """Verifier (OutcomeFn) reward of a terminal node, set when it is first evaluated (None → graded 0)."""
    value: float | None = None
    """The last leaf evaluation of this node (reward, value_fn, rollout or mixed estimate)."""
    rollout_rewards: list[float] = field(default_factory=list)
    """Outcome rewards of the rollouts started at this node (Monte-Carlo step labels)."""
    extra: dict = field(default_factory=dict)
    """Free JSON-serialisable annotations (PRM scores, beam scores, ...)."""

    def to_dict(self) -> dict:
        return {
            "parent": self.parent,
            "depth": self.depth,
            "step": None if self.step is None else self.step.to_dict(),
            "prior": self.prior,
            "children": list(self.children),
            "visits": self.visits,
            "evaluations": self.evaluations,
            "value_sum": self.value_sum,
            "max_value": self.max_value,
            "virtual_loss": self.virtual_loss,
            "terminal": self.terminal,
            "reward": self.reward,
            "value": self.value,
            "rollout_rewards": list(self.rollout_rewards),
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        step = d.get("step")
        return cls(
            parent=d["parent"],
            depth=d["depth"],
            step=None if step is None else StepRecord.from_dict(step),
            prior=d.get("prior", 1.0),
            children=list(d.get("children", [])),
            visits=d.get("visits", 0),
            evaluations=d.get("evaluations", 0),
            value_sum=d.get("value_sum", 0.0),
            max_value=d.get("max_value"),
            virtual_loss=d.get("virtual_loss", 0),
            terminal=d.get("terminal", False),
            reward=d.get("reward"),
            value=d.get("value"),
            rollout_rewards=list(d.get("rollout_rewards", [])),
            extra=dict(d.get("extra", {})),
        )


def _root() -> list[Node]:
    return [Node(parent=NO_PARENT, depth=0)]


@dataclass
class Tree:
    """A search tree over one prompt. Node index = creation order; ``nodes[ROOT]`` is the prompt."""

    prompt: str
    """The formatted prompt text (``Trajectory.prompt`` of the root)."""
    key: int = 0
    """Identifies the prompt (``Trajectory.key``); per-tree random streams are derived from it."""
    meta: dict = field(default_factory=dict)
    """Task columns for the verifier (``Trajectory.meta``)."""
    nodes: list[Node] = field(default_factory=_root)
    """All nodes, indexed by creation order."""
    backup: str = "mean"
    """How Q is defined: ``"mean"`` (value_sum / visits) or ``"max"`` (max_value)."""
    root_priors: list[float] | None = None
    """Priors of the root's children after Dirichlet noise (None = no noise; ``Node.prior`` stays noise-free)."""

    @classmethod
    def from_prompt(cls, prompt: Trajectory, backup: str = "mean") -> Tree:
        """An unexpanded tree whose root is ``prompt`` (which must have no steps)."""
        if prompt.steps:
            raise ValueError(
                f"Tree.from_prompt: prompt key={prompt.key} already has {len(prompt.steps)} steps"
            )
        return cls(prompt=prompt.prompt, key=prompt.key, meta=dict(prompt.meta), backup=backup)

    def __len__(self) -> int:
        return len(self.nodes)

    # -- building ---------------------------------------------------------------------------------------------

    def add_child(self, parent: int, step: StepRecord, prior: float, terminal: bool) -> int:
        """Append a child of ``parent`` and return its index (no merging, no prior normalisation)."""
        node = Node(
            parent=parent, depth=self.nodes[parent].depth + 1, step=step, prior=prior, terminal=terminal
        )
        self.nodes.append(node)
        index = len(self.nodes) - 1
        self.nodes[parent].children.append(index)
        return index

    # -- queries ----------------------------------------------------------------------------------------------

    def path(self, node: int) -> list[int]:
        """Node indices from the root to ``node`` (both included)."""
        out = [node]
        while self.nodes[out[-1]].parent != NO_PARENT:
            out.append(self.nodes[out[-1]].parent)
        return out[::-1]

    def trajectory(self, node: int) -> Trajectory:
        """The prompt plus the steps on the path to ``node``."""
        steps = tuple(self.nodes[i].step for i in self.path(node)[1:])
        return Trajectory(self.prompt, steps, self.key, self.meta)  # type: ignore[arg-type]

    def leaves(self) -> list[int]:
        """Nodes without children (unexpanded or terminal), in index order."""
        return [i for i, n in enumerate(self.nodes) if not n.children]

    def terminal_leaves(self) -> list[int]:
        """Terminal nodes (finished trajectories), in index order."""
        return [i for i, n in enumerate(self.nodes) if n.terminal]

    def open_leaves(self) -> list[int]:
        """Leaves that can still be expanded (not terminal, no children)."""
        return [i for i, n in enumerate(self.nodes) if not n.terminal and not n.children]

    def q(self, node: int) -> float:
        """Q(node): mean (or max, per ``backup``) of the values backed up through it; 0.0 if never visited."""
        n = self.nodes[node]
        if n.visits == 0:
            return 0.0
        if self.backup == "max":
            return n.max_value if n.max_value is not None else 0.0
        return n.value_sum / n.visits

    def child_priors(self, node: int) -> list[float]:
        """Priors of ``node``'s children used for selection (the noisy root priors at the root, if any)."""
        if node == ROOT and self.root_priors is not None:
            return list(self.root_priors)
        return [self.nodes[c].prior for c in self.nodes[node].children]

    # -- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "prompt": self.prompt,
            "key": self.key,
            "meta": self.meta,
            "backup": self.backup,
            "root_priors": None if self.root_priors is None else list(self.root_priors),
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tree:
        if d.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(
                f"Tree.from_dict: unsupported format {d.get('format')!r} (expected {FORMAT_VERSION})"
            )
        priors = d.get("root_priors")
        return cls(
            prompt=d["prompt"],
            key=d.get("key", 0),
            meta=dict(d.get("meta", {})),
            nodes=[Node.from_dict(n) for n in d["nodes"]],
            backup=d.get("backup", "mean"),
            root_priors=None if priors is None else list(priors),
        )

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, exact floats (same tree → same bytes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tree:
        return cls.from_dict(json.loads(text))
