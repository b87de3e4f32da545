"""HTML building blocks of the report: escaping, number formats, tables, embedded figures and the page shell.

Every string that comes from a table or the manifest goes through `esc` (prompts and model names may hold
`<`, `>` and `&`); a value already built as markup is wrapped in `Html` so it is not escaped twice. Figures are
embedded as data URIs (SVG preferred: crisp on screen and paper; PNG otherwise), so the page is one file that
fetches nothing.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Html", "ci", "esc", "figure", "num", "p_is", "page", "para", "pct", "pval", "rate", "section", "table"]

MISSING = "—"
_SVG_MAX_BYTES = 3_000_000  # an SVG larger than this (a dense scatter) is embedded as its PNG instead


class Html(str):
    """Markup that is already escaped (never escaped again)."""


def esc(value: Any) -> Html:
    """`value` as text safe inside HTML elements and attribute values."""
    return value if isinstance(value, Html) else Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def _bad(x: Any) -> bool:
    if x is None:
        return True
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return True


def rate(x: Any) -> str:
    """A rate in [0, 1] as `0.64` (two decimals: ASRs are read against published two-decimal numbers)."""
    return MISSING if _bad(x) else f"{float(x):.2f}"


def pct(x: Any) -> str:
    return MISSING if _bad(x) else f"{100 * float(x):.0f}%"


def ci(lo: Any, hi: Any) -> str:
    """A 95% interval as `0.41–0.86`."""
    return MISSING if _bad(lo) or _bad(hi) else f"{float(lo):.2f}–{float(hi):.2f}"


def pval(p: Any) -> str:
    """A p-value with the precision it deserves: `0.032`, `3.2e-05`, `<1e-300`."""
    if _bad(p):
        return MISSING
    p = float(p)
    if p <= 0:
        return "<1e-300"
    if p >= 0.001:
        return "1" if p >= 1 else f"{p:.3f}".rstrip("0").rstrip(".")
    return f"{p:.1e}"


def p_is(p: Any) -> str:
    """A p-value in a sentence: `p = 0.032`, `p < 1e-300`."""
    text = pval(p)
    return f"p {text[0]} {text[1:]}" if text.startswith("<") else f"p = {text}"


def num(x: Any, digits: int = 3) -> str:
    """A measurement to `digits` significant figures; large values with thousands separators."""
    if _bad(x):
        return MISSING
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    if abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}g}"


def para(*parts: Any, cls: str | None = None) -> Html:
    attr = f' class="{esc(cls)}"' if cls else ""
    return Html(f"<p{attr}>" + join(parts) + "</p>")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "", *, caption: Any = None,
          cls: str = "", fold: Sequence[str] = ()) -> Html:
    """A table. `align` has one letter per column: `l` short text (kept on one line), `w` long text (wraps),
    `r` a number (right-aligned, tabular figures). A column named in `fold` whose cells all hold one value
    (or nothing) is said once in the caption instead (a table of one prompt set need not repeat it on every
    row)."""
    align = (align + "l" * len(header))[:len(header)]
    keep = list(range(len(header)))
    folded = []
    if len(rows) > 1:
        for i, h in enumerate(header):
            values = {str(esc(r[i])) for r in rows} - {MISSING}
            if h in fold and len(values) == 1:
                keep.remove(i)
                folded.append(Html(f"{esc(h)}: {values.pop()}"))
    klass = {"l": "", "r": ' class="num"', "w": ' class="wrap"'}
    head = "".join(f'<th{klass[align[i]]} scope="col">{esc(header[i])}</th>' for i in keep)
    body = "\n".join("<tr>" + "".join(f"<td{klass[align[i]]}>{esc(row[i])}</td>" for i in keep) + "</tr>"
                     for row in rows)
    if caption is not None or folded:
        note = f' <span class="small">({join(folded, "; ")})</span>' if folded else ""
        cap = f"<caption>{esc(caption if caption is not None else '')}{note}</caption>"
    else:
        cap = ""
    extra = f" {esc(cls)}" if cls else ""
    return Html(f'<div class="scroll"><table class="data{extra}">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>\n{body}\n</tbody></table></div>")


def _data_uri(paths: dict[str, Path]) -> tuple[str, str] | None:
    """(data URI, format) of a saved figure: its SVG when present and not huge, else its PNG."""
    svg, png = paths.get("svg"), paths.get("png")
    if svg is not None and svg.is_file() and svg.stat().st_size <= _SVG_MAX_BYTES:
        return "data:image/svg+xml;base64," + base64.b64encode(svg.read_bytes()).decode("ascii"), "svg"
    if png is not None and png.is_file():
        return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii"), "png"
    return None


def figure(name: str, title: str, caption: str, paths: dict[str, Path]) -> Html:
    """One embedded figure with its title and caption; empty markup (no broken image) when its file is gone."""
    got = _data_uri(paths)
    if got is None:
        return Html("")
    uri, fmt = got
    return Html(f'<figure id="fig-{esc(name)}"><img src="{uri}" alt="{esc(title)}" data-format="{fmt}" '
                f'loading="eager" decoding="sync"><figcaption><b>{esc(title)}.</b> {esc(caption)}'
                "</figcaption></figure>")


def section(anchor: str, title: str, body: Iterable[Any], level: int = 2) -> Html:
    return Html(f'<section id="{esc(anchor)}"><h{level}>{esc(title)}</h{level}>\n' + join(body, "\n")
                + "\n</section>")


CSS = """
:root { --ink: #222; --muted: #5f5f5f; --rule: #d9d9d9; --soft: #f4f6f8; --accent: #0072B2; --warn: #A64500; }
* { box-sizing: border-box; }
html { font-size: 16px; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: var(--ink); line-height: 1.5; margin: 0 auto; max-width: 72rem; padding: 1.25rem 1.5rem 3rem;
  background: #fff; }
h1 { font-size: 1.5rem; margin: 0 0 .2rem; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .6rem; padding-top: .4rem; border-top: 1px solid var(--rule); }
h2.first { border-top: none; margin-top: .6rem; padding-top: 0; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p, li { max-width: 62rem; }
a { color: var(--accent); }
code, pre, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: .88em; }
pre { background: var(--soft); padding: .75rem 1rem; overflow-x: auto; white-space: pre-wrap;
  word-break: break-word; border-radius: 4px; max-height: 40rem; }
.sub { color: var(--muted); margin: 0 0 .6rem; }
nav.toc { font-size: .9rem; margin: .3rem 0 .6rem; color: var(--muted); }
nav.toc a { margin-right: .9rem; white-space: nowrap; }
.findings { background: var(--soft); border-left: 4px solid var(--accent); padding: .5rem 1.2rem .5rem 1rem;
  margin: .6rem 0 .8rem; font-size: .95rem; line-height: 1.42; }
.findings ul { margin: .3rem 0; padding-left: 1.2rem; }
.findings li { margin: .25rem 0; }
.absent { color: var(--muted); }
.absent li { margin: .1rem 0; }
.warn { color: var(--warn); font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; margin: .5rem 0 1rem; }  /* a wide table scrolls in its own box */
table.data { border-collapse: collapse; font-size: .88rem; min-width: 20rem; }
table.data caption { text-align: left; font-weight: 600; padding: .2rem 0 .35rem; color: var(--ink); }
table.data th, table.data td { padding: .25rem .5rem; border-bottom: 1px solid var(--rule); text-align: left;
  vertical-align: top; }
table.data td { white-space: nowrap; }
table.data td.wrap { white-space: normal; min-width: 7rem; }
table.summary th, table.summary td { white-space: normal; padding: .25rem .35rem; }  /* fits a laptop */
table.summary { font-size: .84rem; }
table.data.summary td.num { white-space: normal; }  /* "0.95 / 0.00 → 0.25 / 0.00" may break at its spaces */
table.data caption .small { font-weight: normal; }
table.data th { background: var(--soft); font-weight: 600; border-bottom: 2px solid #bfbfbf; }
table.data td.num, table.data th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.data tbody tr:nth-child(even) td { background: #fafbfc; }
table.summary td:first-child { font-weight: 600; }
td .small, .small { font-size: .85em; color: var(--muted); }
.tag { display: inline-block; padding: 0 .4rem; border-radius: 3px; font-size: .85em; border: 1px solid; }
.tag.yes { color: #005A8C; border-color: #0072B2; }
.tag.no { color: var(--muted); border-color: #bfbfbf; }
.tag.broken { color: var(--warn); border-color: #D55E00; }
.tag.mixed { color: #7a5a00; border-color: #E69F00; }
figure { margin: 1rem 0 1.6rem; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: .85rem; color: var(--muted); margin-top: .4rem; max-width: 62rem; }
figcaption b { color: var(--ink); }
.quote { font-size: .95em; min-width: 14rem; max-width: 28rem; white-space: normal; overflow-wrap: anywhere; }
.findings ul ul { list-style: none; padding-left: 0; margin: .1rem 0 .2rem; }
.findings ul ul li { margin: .05rem 0; }
@media (max-width: 700px) { body { padding: .8rem; } html { font-size: 15px; } }
@media print {
  @page { margin: 14mm 12mm; }
  html { font-size: 10.5pt; }
  body { max-width: none; padding: 0; }
  nav.toc { display: none; }
  a { color: inherit; text-decoration: none; }
  h2 { break-after: avoid; page-break-after: avoid; border-top: none; }
  h3, caption { break-after: avoid; page-break-after: avoid; }
  figure, table, .findings, pre { break-inside: avoid; page-break-inside: avoid; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  thead { display: table-header-group; }
  .scroll { overflow: visible; }
  pre { max-height: none; white-space: pre-wrap; }
  figure img { max-height: 23cm; width: auto; }
  table.data tbody tr:nth-child(even) td { background: none; }
}
"""


def page(title: str, body: Iterable[Any]) -> Html:
    """The whole self-contained document."""
    return Html('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                # the page may load nothing: every figure is a data URI and the style is inline
                '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
                'style-src \'unsafe-inline\'">\n'
                f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                + join(body, "\n") + "\n</body>\n</html>\n")
