"""Figures of what a study found, drawn from its tables only (never torch), in one style (analysis.style).

Each figure function takes tables (pandas frames or Arrow tables) holding ONE figure's worth of rows and
returns a `matplotlib.figure.Figure`; the matching `*_units` function splits a whole table into such pieces
(ValueError names the column when a function is given several). `save` writes PNG and SVG; `make_figures`
draws everything a run folder supports into RUN/figures/ and skips, with a logged reason, what it does not.

    from analysis.figures import make_figures
    for rec in make_figures("runs/quickstart"):
        print(rec.name, rec.paths["png"], rec.caption)

| function | table(s) | shows |
|---|---|---|
| `head_heatmap` | rankings (or ships / head_scores) | layer x head: mean KL, top-k share, angle; top boxed |
| `overlap_figure` (`overlap_venn`, `overlap_upset`) | overlap (+ rankings) | shared top-k heads, exact p-values |
| `joint_steps_figure` | joint_steps (+ joint) | the joint search's objective and open gates per step, per seed |
| `asr_curve_figure` | asr_curve | ASR vs group size, random band, normal level; over-refusal, degenerate |
| `specificity_figure` | specificity | harmful vs benign KL per head, log-log, diagonal, top labelled |
| `swaps_figure` | swaps | ASR / over-refusal / safety-head KL per swap recipe, published markers |
| `utility_figure` | utility | perplexity ratio to the normal model vs group size |
"""

from __future__ import annotations

from analysis.figures._common import caption_of
from analysis.figures.curves import asr_curve_figure, asr_curve_units
from analysis.figures.heatmaps import head_heatmap, heatmap_units
from analysis.figures.joint import joint_steps_figure, joint_steps_units
from analysis.figures.make import FORMATS, FigureRecord, make_figures, save
from analysis.figures.scatter import specificity_figure, specificity_units
from analysis.figures.sets import overlap_figure, overlap_units, overlap_upset, overlap_venn, region_sizes
from analysis.figures.swaps import RECIPES, swaps_figure, swaps_units
from analysis.figures.utility import utility_figure, utility_units

__all__ = [
    "FORMATS",
    "RECIPES",
    "FigureRecord",
    "asr_curve_figure",
    "asr_curve_units",
    "caption_of",
    "head_heatmap",
    "heatmap_units",
    "joint_steps_figure",
    "joint_steps_units",
    "make_figures",
    "overlap_figure",
    "overlap_units",
    "overlap_upset",
    "overlap_venn",
    "region_sizes",
    "save",
    "specificity_figure",
    "specificity_units",
    "swaps_figure",
    "swaps_units",
    "utility_figure",
    "utility_units",
]
