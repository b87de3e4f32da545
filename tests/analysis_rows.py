"""Hand-built `ships` rows for the analysis tests: four heads, two prompts, exact binary-fraction KLs."""

from __future__ import annotations

from typing import Any

HEADS = ["L0H0", "L0H1", "L1H0", "L1H1"]
# per prompt, KL of HEADS in that order (exact binary fractions: means compare exactly)
HARM = {"p1": [0.875, 0.125, 0.5, 0.25], "p2": [0.125, 0.75, 0.625, 0.375]}
# mean KL: L0H0 .5, L0H1 .4375, L1H0 .5625, L1H1 .3125 -> ranks L1H0, L0H0, L0H1, L1H1


def ships_rows(kls: dict[str, list[float]], *, model: str = "m", dataset: str = "harm", op: str = "undiff_q",
               run_id: str = "r1", revision: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for pid, values in kls.items():
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        rank = {i: r for r, i in enumerate(order, start=1)}
        for i, kl in enumerate(values):
            label = HEADS[i]
            rows.append(dict(run_id=run_id, model=model, model_revision=revision, dataset=dataset,
                             prompt_format="paper", code_version="0", prompt_id=pid, prompt=f"q {pid}",
                             layer=int(label[1]), head=int(label[3]), head_label=label, op=op, eps=1e-5, kl=kl,
                             rank=rank[i], exact=True))
    return rows
