"""How work runs and where results go: shards, the worker, executors, progress, the result schemas and store."""
