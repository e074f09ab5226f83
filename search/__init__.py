"""thinktree.search — Monte Carlo tree search over a language model's reasoning steps.

The core (tree, selection, mcts, baselines, budget, store, types) imports only numpy and the standard library;
model backends that adapt a model to the batched :class:`StepProposer` protocol live in ``search/backends/``.
"""

from thinktree.search.types import OutcomeFn, StepProposer, StepRecord, Trajectory, ValueFn

__all__ = ["OutcomeFn", "StepProposer", "StepRecord", "Trajectory", "ValueFn"]
