"""`write_report`: one self-contained HTML page of what a study found, from its run folder's tables only.

    from analysis.report import write_report
    path = write_report("runs/quickstart")          # runs/quickstart/report.html (figures also in figures/)

The first screen says what was found in sentences and a compact table (each model's safety heads, what
ablating them does to ASR against random heads of the same number, whether the models share heads, what the
base-weight swaps did, published numbers beside the measured ones); then one section per experiment the run
holds, then the spec, versions, timings and where each table lives. Any subset of experiments and any number
of models works: an absent experiment is one plain line, never an error or an empty section.

The page fetches nothing (figures are data URIs, the style is inline, a Content-Security-Policy forbids the
rest), prints cleanly, and escapes every string taken from the tables (prompts may hold `<script>`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from analysis.figures import FigureRecord, make_figures
from analysis.report._details import details_section
from analysis.report._findings import findings
from analysis.report._html import Html, esc, join, page
from analysis.report._load import RunData, load_run
from analysis.report._sections import experiment_sections
from study.core.files import write_text_atomic

__all__ = ["REPORT_NAME", "RunData", "load_run", "render_report", "write_report"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"


def _header(data: RunData, toc: Sequence[tuple[str, str]]) -> Html:
    m = data.manifest
    models = data.models()
    bits = [f"run folder {data.run_dir.name}"]
    if m.get("run_id"):
        bits.append(f"run {m['run_id']}")
    bits.append(f"{len(models)} model{'s' if len(models) != 1 else ''}")
    links = join((Html(f'<a href="#{esc(a)}">{esc(label)}</a>') for a, label in toc), "")
    return Html(f"<header><h1>headstudy report: the attention heads safety depends on</h1>"
                f'<p class="sub">{esc(" · ".join(bits))}</p>'
                f'<nav class="toc" aria-label="Contents">Contents: {links}</nav></header>')


def render_report(data: RunData, figures: Sequence[FigureRecord]) -> str:
    """The report's HTML for loaded run data and its drawn figures (pure: reads only the figure files)."""
    sections = experiment_sections(data, figures)
    toc = [("findings", "Findings"), *[(a, label) for a, label, _ in sections], ("run", "Run details")]
    summary = Html('<section id="findings"><h2 class="first">What was found</h2>\n' + join(findings(data), "\n")
                   + "\n</section>")
    body = [_header(data, toc), summary, *[html for _, _, html in sections], details_section(data, figures)]
    return page(f"headstudy report: {data.run_dir.name}", body)


def _target(run: Path, out: str | os.PathLike[str] | None) -> Path:
    if out is None:
        return run / REPORT_NAME
    path = Path(out)
    return path / REPORT_NAME if path.is_dir() else path


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the run's figures (kept in RUN/figures/) and write the report to `out` (None: RUN/report.html; a
    folder: FOLDER/report.html) atomically, so a reader never opens half a page; returns its path.

    UsageError naming `run_dir` when it is not a run folder.
    """
    data = load_run(run_dir)
    figures = make_figures(data.run_dir)
    text = render_report(data, figures)
    path = _target(data.run_dir, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text, durable=False)
    log.info("report: wrote %s (%d figures, %.0f kB)", path, len(figures), path.stat().st_size / 1024)
    return path
