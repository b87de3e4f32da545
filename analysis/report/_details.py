"""The closing section: the models, the study spec, versions, timings, the runs the folder holds, and where
each table lives with how to read it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from analysis.figures import FigureRecord
from analysis.report._html import MISSING, Html, esc, num, para, section, table
from analysis.report._load import RunData, table_files
from study.runtime.store import MANIFEST, MANIFESTS_DIR

__all__ = ["details_section"]


def _spec_text(config: dict[str, Any]) -> str:
    """The spec as YAML, without the sections and settings it leaves empty (a one-command run sets a few)."""
    config = {k: v for k, v in config.items() if v not in (None, {}, [])}
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
    except Exception:  # noqa: BLE001 - a value yaml cannot represent: JSON says it too
        return json.dumps(config, indent=2, default=str, ensure_ascii=False)


def _models_table(data: RunData) -> Html:
    entries = {str(m.get("name")): m for m in data.config.get("models") or [] if isinstance(m, dict)}
    ids = list(dict.fromkeys([*entries, *data.models()]))
    rows = [[data.label(m), Html(f'<span class="mono">{esc(m)}</span>'), (entries.get(m) or {}).get("role") or MISSING,
             data.label((entries.get(m) or {}).get("base")) if (entries.get(m) or {}).get("base") else MISSING,
             "yes" if m in data.models() else "no"] for m in ids]
    return table(["Label", "Model", "Role", "Base", "In the tables"], rows, caption="Models")


def _worker_name(data: RunData, name: str) -> str:
    """`/path/aligned_a [attn-from-base]` (a mixed model of a swap) -> `aligned_a [attn-from-base]`."""
    model, sep, rest = name.partition(" [")
    return data.label(model) + sep + rest


def _timings(data: RunData) -> list[Html]:
    m = data.manifest
    out: list[Html] = []
    times = m.get("timings_s") if isinstance(m.get("timings_s"), dict) else {}
    shards = m.get("shards") if isinstance(m.get("shards"), dict) else {}
    if times or shards:
        bits = [f"{k}: {num(v)} s" for k, v in times.items()]
        bits += [f"shards {k}: {v}" for k, v in shards.items()]
        out.append(para("Latest run: " + "; ".join(bits) + "."))
    stats = m.get("models") if isinstance(m.get("models"), dict) else {}
    if stats:
        cols = ["actors", "shards", "reused", "retries", "rows", "seconds"]
        rows = [[_worker_name(data, name)] + [(num(s.get(c)) if c == "seconds" else s.get(c, MISSING))
                                              if isinstance(s, dict) else MISSING for c in cols]
                for name, s in stats.items()]
        out.append(table(["Model", "Actors", "Shards computed", "Reused", "Retries", "Rows", "Seconds"], rows,
                         "lrrrrrr", caption="Work per model (latest run)"))
    return out


def _runs(data: RunData) -> Html:
    if len(data.manifests) < 2:
        return Html("")
    rows = []
    for m in data.manifests:
        sh = m.get("shards") if isinstance(m.get("shards"), dict) else {}
        t = m.get("timings_s") if isinstance(m.get("timings_s"), dict) else {}
        rows.append([Html(f'<span class="mono">{esc(m.get("run_id", MISSING))}</span>'), m.get("command", MISSING),
                     m.get("config_hash", MISSING), sh.get("computed", MISSING), sh.get("reused", MISSING),
                     num(t.get("total"))])
    return table(["Run", "Command", "Spec hash", "Shards computed", "Reused", "Seconds"], rows, "lllrrr",
                 caption=f"Runs committed to this folder ({MANIFESTS_DIR}/), oldest first")


def _files(data: RunData, figs: Sequence[FigureRecord]) -> list[Html]:
    found = table_files(data.run_dir)
    listed = data.manifest.get("files") if isinstance(data.manifest.get("files"), dict) else {}
    rows = [[Html(f'<span class="mono">{esc(name)}/</span>'), files, rows, len(listed.get(name) or [])]
            for name, (files, rows) in found.items()]
    out = [table(["Table folder", "Parquet files", "Rows", "Files in the manifest"], rows, "lrrr",
                 caption="Where each table lives: RUN/<table>/<model>/<part>.parquet") if rows
           else para("The folder holds no table files.")]
    run = str(data.run_dir)
    out.append(Html("<p>Each folder is a Parquet dataset, one file per model folder and condition; read any of "
                    f"them with <code>pandas.read_parquet({esc(repr(run + '/ships'))})</code> (or pyarrow.dataset, "
                    "DuckDB, polars), or with the declared schema through <code>study.runtime.store.read_table("
                    f"{esc(repr(run))}, 'ships')</code>. The manifest is <code>{esc(MANIFEST)}</code>.</p>"))
    if data.derived_here:
        out.append(para(f"Not in the folder, derived in memory for this report: {', '.join(data.derived_here)} "
                        "(analysis.derive.derive writes them)."))
    if figs:
        out.append(para(f"Figures: {len(figs)} saved as PNG and SVG in figures/ ("
                        + ", ".join(f.name for f in figs) + ")."))
    checkpoints = [(j.get("model"), j.get("checkpoint")) for j in data.manifest.get("jobs") or []
                   if isinstance(j, dict) and j.get("experiment") == "surgery" and j.get("checkpoint")]
    if checkpoints:
        out.append(table(["Model", "Checkpoint"], [[data.label(m), c] for m, c in checkpoints],
                         caption="Surgery checkpoints (heads ablated in the weights)"))
    return out


def details_section(data: RunData, figs: Sequence[FigureRecord]) -> Html:
    m = data.manifest
    body: list[Any] = [_models_table(data)]
    if m:
        head = [f"Run {m.get('run_id', MISSING)}", f"command {m.get('command', MISSING)}",
                f"spec hash {m.get('config_hash', MISSING)}"]
        body.append(para("; ".join(head) + "."))
        body.append(Html("<h3>Study spec</h3><pre>" + esc(_spec_text(data.config) if data.config else "(none)")
                         + "</pre>"))
        versions = m.get("versions") if isinstance(m.get("versions"), dict) else {}
        code = m.get("code") if isinstance(m.get("code"), dict) else {}
        rows = [[k, v] for k, v in versions.items()] + [[f"code {k}", v] for k, v in code.items()]
        if rows:
            body.append(table(["Package", "Version"], rows, caption="Versions"))
        body += _timings(data)
        body.append(_runs(data))
    else:
        body.append(para(f"This folder has no {MANIFEST}: it holds tables only, so the spec, versions and "
                         "timings are unknown."))
    body.append(Html("<h3>Tables and files</h3>"))
    body += _files(data, figs)
    return section("run", "Run details", body)
