"""GPU worker: model loading, persona priming, the batched session pool, its server and metrics."""
