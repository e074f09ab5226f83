"""thinktree.search — Monte Carlo tree search over a language model's reasoning steps.

The core (tree, selection, mcts, gumbel, baselines, budget, store, types, toy) imports only numpy and the standard
library; model backends that adapt a model to the batched :class:`StepProposer` protocol live in
``search/backends/``.
"""

from thinktree.search.baselines import best_of_n, greedy, step_beam
from thinktree.search.budget import Budget, SearchResult, tree_rng
from thinktree.search.gumbel import gumbel_search
from thinktree.search.mcts import MCTSConfig, search, search_with_seed
from thinktree.search.selection import SELECT_FNS, choose_answer, puct_select, uct_select
from thinktree.search.store import TreeStore, search_resumable
from thinktree.search.tree import NO_PARENT, ROOT, Node, Tree
from thinktree.search.types import OutcomeFn, StepProposer, StepRecord, Trajectory, ValueFn

__all__ = [
    "NO_PARENT",
    "ROOT",
    "SELECT_FNS",
    "Budget",
    "MCTSConfig",
    "Node",
    "OutcomeFn",
    "SearchResult",
    "StepProposer",
    "StepRecord",
    "Trajectory",
    "Tree",
    "TreeStore",
    "ValueFn",
    "best_of_n",
    "choose_answer",
    "greedy",
    "gumbel_search",
    "puct_select",
    "search",
    "search_resumable",
    "search_with_seed",
    "step_beam",
    "tree_rng",
    "uct_select",
]
