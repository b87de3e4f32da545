"""The bottom layer: typed values (`Head`, `Ablation`, `ModelShape`), architecture knowledge as data, the
frozen-config base, errors, atomic files, and the math over tensors (interventions, base passes, the scan
engine, scores, the greedy search, screening, statistics). Imports nothing else from `study`.
"""
