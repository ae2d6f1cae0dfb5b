"""The data plane: windows and splits, normalisation statistics, shard plans and rank loaders."""
