"""A run's on-disk state: ``stages.json`` (finished stages and their records), the :class:`Run` a training loop
holds, the tree stores of a round, and the weight digest that checks replicas agree across ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from thinktree.search.store import TreeStore
from thinktree.trainer.checkpoint import save_model
from thinktree.trainer.config import RecipeConfig
from thinktree.trainer.distributed import Topology
from thinktree.trainer.models import (
    NonFiniteWeightsError,
    check_finite_weights,
    save_policy,
)
from thinktree.trainer.outputs import write_json_atomic

log = logging.getLogger("thinktree")


_STAGE_DIR = re.compile(r"^(warm_start|round-\d+)$")


def relative_checkpoint(path: str) -> str:
    """A ``checkpoint`` entry as stored: relative to the run dir. Entries written before paths were relative are
    absolute; one that names a stage's checkpoint (``.../round-02/checkpoint``) becomes relative, so a moved or
    copied run dir uses its own weights; any other absolute path is kept."""
    p = Path(path)
    if p.is_absolute() and len(p.parts) >= 2 and p.name == "checkpoint" and _STAGE_DIR.match(p.parent.name):
        return f"{p.parent.name}/{p.name}"
    return path


class Stages:
    """``stages.json``: the finished stages of a run, each with its small result record (rank 0 writes it).

    Checkpoint paths are stored relative to the run dir (``round-02/checkpoint``) and resolved on read
    (:meth:`resolve`), so a run dir moved or copied elsewhere resumes from its own files."""

    def __init__(self, out: Path, topo: Topology) -> None:
        self.out, self.path, self.topo = out, out / "stages.json", topo
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        for record in self.done.values():
            if isinstance(record, dict) and isinstance(record.get("checkpoint"), str):
                record["checkpoint"] = relative_checkpoint(record["checkpoint"])

    def get(self, name: str) -> Any:
        return self.done.get(name)

    def resolve(self, checkpoint: str) -> str:
        """A stored checkpoint entry as a path to load (relative entries are under this run dir)."""
        return str(checkpoint if Path(checkpoint).is_absolute() else self.out / checkpoint)

    def finish(self, name: str, record: Any) -> None:
        self.done[name] = record
        if self.topo.is_main:
            write_json_atomic(self.path, self.done)
        self.topo.barrier()

    def last_checkpoint(self) -> str | None:
        for record in reversed(list(self.done.values())):
            if isinstance(record, dict) and record.get("checkpoint"):
                return self.resolve(record["checkpoint"])
        return None


@dataclasses.dataclass
class Run:
    """Everything one training run holds: recipe, processes, output dir, task, policy."""

    cfg: RecipeConfig
    topo: Topology
    out: Path
    stages: Stages
    task: Any
    model: Any
    tokenizer: Any
    reference: Any = None
    """The round-0 policy, frozen (health metrics: KL drift)."""
    engine: Any = None
    """Under DeepSpeed ZeRO-3 only: the training engine that holds the partitioned weights."""

    @contextlib.contextmanager
    def policy(self) -> Iterator[Any]:
        """The live policy for search and evaluation (ZeRO-3: parameters gathered; every rank must enter)."""
        if self.engine is None:
            yield self.model
        else:
            with self.engine.unwrap_for_generation() as model:
                yield model

    def save(self, path: Path) -> str:
        """Save the policy to ``path`` (under the run dir); returns the path relative to the run dir."""
        if self.engine is not None:
            save_model(self.engine, path, tokenizer=self.tokenizer)
        else:
            if self.topo.is_main:
                save_policy(self.model, self.tokenizer, path)
            self.topo.barrier()
        return path.relative_to(self.out).as_posix()

    def check_finite(self, where: str) -> None:
        """Fail loudly (:class:`NonFiniteWeightsError`, on every rank) when the policy's weights hold NaN or inf."""
        try:
            check_finite_weights(self.model, where)
            error = None
        except NonFiniteWeightsError as e:
            error = str(e)
        errors = [e for e in self.topo.gather(error) if e]
        if errors:
            raise NonFiniteWeightsError(
                f"{errors[0]}; the stage is not recorded: rerun with the fix in a new output.dir"
            )


def weights_digest(model) -> str:
    """SHA-256 of a model's parameters (name, dtype and bytes), to compare replicas across ranks."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stores(rdir: Path) -> list[TreeStore]:
    return [TreeStore(p) for p in sorted(rdir.glob("trees*.jsonl"))]
