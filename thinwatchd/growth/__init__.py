"""Growing pools: which are reconciled when, the extender, what is kept and said of each."""
