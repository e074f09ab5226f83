"""Model backends: adapt a model to the batched :class:`thinktree.search.StepProposer` protocol."""
