"""Models by name: built-in aliases (the embedded base and its family), loading, the model cache, LoRA
adapters, base-weight swaps (mixing) and surgery.
"""
