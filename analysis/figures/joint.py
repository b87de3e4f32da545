"""The joint search's optimisation (the `joint_steps` table): the smooth objective each step maximised and the
gates open after it, one line per seed, so a reader sees whether the seeds settled and whether they agree."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis import style
from analysis.figures._common import MAX_PANELS, Table, as_frame, chunks, groups, numeric, one, set_caption

__all__ = ["joint_steps_figure", "joint_steps_units"]

_UNIT = ["dataset", "prompt_format", "objective"]
_VALUE = {"refusal": "log(1 − p) gained\n(p: refusal openings)", "subspace": "log Σ sin² of the angles"}


def joint_steps_units(joint_steps: Table, max_models: int = MAX_PANELS) -> list[pd.DataFrame]:
    """The `joint_steps` table split into one frame per (prompt set, format, objective) and at most
    `max_models` models."""
    out = []
    for _, g in groups(as_frame(joint_steps, "joint_steps"), _UNIT):
        for part in chunks(list(dict.fromkeys(g["model"])), max_models):
            out.append(g[g["model"].isin(part)])
    return out


def _selected(joint: Table | None, unit: dict[str, Any]) -> dict[str, int]:
    """Model -> the seed whose group the search took (none known without the `joint` table)."""
    if joint is None:
        return {}
    j = as_frame(joint, "joint")
    j = j[j["selected"] & (j["dataset"] == unit["dataset"]) & (j["prompt_format"] == unit["prompt_format"])
          & (j["objective"] == unit["objective"])]
    return {str(m): int(g["seed"].min()) for m, g in j.groupby("model")}


def joint_steps_figure(joint_steps: Table, joint: Table | None = None) -> Figure:
    """One row of two panels per model: the objective the steps maximised (`value`) and the gates above 0.5
    (`open`) against the step, a line per seed (gids `joint:value:<seed>`, `joint:open:<seed>`); the seed
    `joint` marks selected is drawn thicker and named so."""
    df = as_frame(joint_steps, "joint_steps")
    if df.empty:
        raise ValueError("joint_steps_figure: empty table")
    unit = {c: one(df, c, "joint_steps_figure") for c in _UNIT}
    selected = _selected(joint, unit)
    models = list(dict.fromkeys(df["model"]))
    labels = style.model_labels(models)
    with style.context():
        fig = style.new_figure(7.2, 2.2 * len(models) + 0.9)
        axes = fig.subplots(len(models), 2, squeeze=False)
        for (ax_v, ax_o), model in zip(axes, models):
            for i, (key, g) in enumerate(groups(df[df["model"] == model], ["seed"])):
                g, seed = g.sort_values("step"), int(key[0])
                chosen = selected.get(str(model)) == seed
                kw = dict(color=style.color(i), linewidth=2.2 if chosen else 1.2,
                          label=f"seed {seed}" + (" (selected)" if chosen else ""))
                ax_v.plot(g["step"], numeric(g["value"]), gid=f"joint:value:{seed}", **kw)
                ax_o.plot(g["step"], numeric(g["open"]), gid=f"joint:open:{seed}", drawstyle="steps-post", **kw)
            ax_v.set_ylabel(_VALUE.get(str(unit["objective"]), "objective"))
            ax_o.set_ylabel("gates above 0.5")
            ax_o.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax_v.set_title(f"{labels[model]}: objective")
            ax_o.set_title(f"{labels[model]}: open gates")
            for ax in (ax_v, ax_o):
                ax.set_xlabel("step")
                ax.grid(axis="y")
                ax.set_axisbelow(True)
        handles: dict[str, object] = {}
        for ax in axes.ravel():
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(5, len(handles)))
        fig.suptitle(f"Joint search over the steps — {unit['dataset']} · {unit['objective']} objective · format "
                     f"{unit['prompt_format']}", ha="left", x=0.01)
    caption = (f"The joint search on {unit['dataset']} ({unit['objective']} objective): left, the smooth objective "
               "each step maximised (before the sparsity penalty); right, how many heads' gates are above 0.5 after "
               "it. One line per seed" + (", the selected seed thicker" if selected else "")
               + ": seeds that end at the same level with as many open gates agree on how large a group it takes.")
    return set_caption(fig, caption, ["joint_steps", "joint"] if joint is not None else ["joint_steps"])
