"""Ray plumbing: the cluster connection, model actors (one per GPU or CPU slot) and the Ray executor.

Everything that imports ray lives here; `study` reaches it only through `study.runtime.executor.make_executor`.
"""
