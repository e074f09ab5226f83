"""Process topology for the round pipeline: shard prompts over ranks, gather results, let rank 0 write.

Under ``accelerate launch`` with several processes, every rank searches and evaluates its share of the prompts
(``prompts[rank::world]``) and the results are gathered with ``torch.distributed`` (gloo on CPU, NCCL on GPUs, as
accelerate set up); files shared by the run (stages, summaries, checkpoints) are written by rank 0 only, with a
barrier after. In a plain single process every helper here is a no-op, so the same code path serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["Topology", "topology"]


class Topology:
    """Rank, world size and the few collectives the pipeline needs (no-ops in a single process)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every ``world``-th item starting at ``rank`` (keeps prompt keys globally unique)."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def check_same(self, what: str, value: Any) -> None:
        """RuntimeError unless every rank holds the same ``value`` (e.g. a hash of the weights)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(
                f"ranks disagree on {what}: {values} (is the distributed setup synchronising?)"
            )

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a one-item list in a single process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def topology() -> Topology:
    """The current process topology: from accelerate's state when launched with several processes, else 1 process.

    On a machine without CUDA the process group uses gloo (accelerate would otherwise pick none and run each rank as
    if alone; see docs in recipes/accelerate/cpu_ddp_2.yaml), and the state is made with ``cpu=True``: the shared
    state decides the engine's distributed type, and ``backend="gloo"`` alone gives ``DistributedType.NO`` — a
    no-op ``wait_for_everyone`` and no gradient synchronisation (each rank then trained its own shard alone).
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Topology()
    import torch
    from accelerate import PartialState

    state = PartialState(**({} if torch.cuda.is_available() else {"cpu": True, "backend": "gloo"}))
    return Topology(state.process_index, state.num_processes)
