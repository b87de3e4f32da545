"""The report in a real browser: headless Chromium (Debian's `chromium` package) opens report.html through the
DevTools protocol; every figure renders with a size, the page logs no error, requests nothing but the file
itself and its data URIs, fits a laptop screen, and still shows its figures when emulating print. A
screenshot of the first screen is saved as report.png beside the report."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from analysis.report import write_report  # noqa: E402
from tests.cdp import Browser, find_browser  # noqa: E402
from tests.unit.test_report import build_run  # noqa: E402

BINARY = find_browser()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                                       "(apt-get install chromium to run the browser check)")
WIDTH, HEIGHT = 1366, 900

MEASURE = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return {w: r.width, h: r.height, top: r.top + scrollY}; };
  return {
    imgs: [...document.images].map(i => ({...box(i), complete: i.complete, natural: i.naturalWidth,
                                          src: (i.getAttribute('src') || '').slice(0, 26)})),
    svgs: [...document.querySelectorAll('svg')].map(box),
    scrollWidth: document.documentElement.scrollWidth,
    bodyWidth: document.body.getBoundingClientRect().width,
    findingsTop: document.getElementById('findings').getBoundingClientRect().top,
    tocDisplay: getComputedStyle(document.querySelector('nav.toc')).display,
    fontSize: parseFloat(getComputedStyle(document.body).fontSize),
    tables: [...document.querySelectorAll('table')].map(t => {
      const box = t.parentElement;
      return {caption: (t.caption ? t.caption.textContent : '').slice(0, 40), table: t.scrollWidth,
              boxClass: box.className, boxRight: box.getBoundingClientRect().right, boxWidth: box.clientWidth,
              overflowX: getComputedStyle(box).overflowX, scrollable: box.scrollWidth > box.clientWidth};
    }),
  };
})()"""


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def rendered(state: dict[str, Any]) -> None:
    """Every figure loaded and laid out with a size."""
    assert state["imgs"], "no figures on the page"
    for img in state["imgs"]:
        assert img["complete"] and img["natural"] > 0, img
        assert img["w"] > 50 and img["h"] > 50, img
    for svg in state["svgs"]:
        assert svg["w"] > 0 and svg["h"] > 0, svg


def check_report(report: Path, workdir: Path) -> dict[str, Any]:
    """Open `report` in Chromium and assert what a reader relies on; returns the screen measurements."""
    assert BINARY is not None
    with Browser.start(BINARY, workdir, WIDTH, HEIGHT) as page:
        page.open(report.as_uri(), WIDTH, HEIGHT)
        screen = page.evaluate(MEASURE)
        rendered(screen)
        assert screen["scrollWidth"] <= WIDTH, "the page scrolls sideways on a laptop screen"
        assert screen["bodyWidth"] <= 1200 and screen["fontSize"] >= 14
        assert screen["findingsTop"] < HEIGHT / 2, "the findings are not on the first screen"
        for t in screen["tables"]:  # each table fits, or scrolls sideways inside its own box on the screen
            assert t["boxClass"] == "scroll" and t["overflowX"] == "auto" and t["boxRight"] <= WIDTH, t
            assert t["table"] <= t["boxWidth"] or t["scrollable"], t
        summary = [t for t in screen["tables"] if t["caption"].startswith("Summary per model")]
        assert summary and all(t["table"] <= t["boxWidth"] for t in summary), summary  # the first screen fits
        shot = page.screenshot(report.parent / "report.png")
        assert png_size(shot) == (WIDTH, HEIGHT)
        page.send("Emulation.setEmulatedMedia", {"media": "print"})
        printed = page.evaluate(MEASURE)
        rendered(printed)
        assert printed["tocDisplay"] == "none"
        assert page.print_pdf()[:5] == b"%PDF-"
        assert page.errors() == []
        foreign = [u for u in page.requests() if not u.startswith(("file:", "data:"))]
        assert foreign == [], foreign
    return screen


def test_the_report_renders_in_chromium(tmp_path: Path) -> None:
    run = build_run(tmp_path / "run", degenerate=8)
    report = write_report(run)
    screen = check_report(report, tmp_path)
    assert len(screen["imgs"]) >= 10  # heatmaps, overlap, specificity, ASR, swaps, utility
    assert (run / "report.png").stat().st_size > 10_000
