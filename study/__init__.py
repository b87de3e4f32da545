"""headstudy core: heads, models, prompts, ablation, the scan engine, scores, search, tables and the CLI.

Nothing here imports ray or vllm at module level; distribution lives in `actors/`.
"""

__version__ = "0.1.0"
