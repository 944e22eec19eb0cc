"""The report files: figures built from the analytics data, the self-contained
HTML file opened in headless Chromium, and the PNG and PDF drawn by kaleido.
The data is hand-written (tests/report_data.py), so no database is needed."""

from __future__ import annotations

from collections.abc import Iterator

import plotly.graph_objects as go
import pytest
from headless_chromium import HeadlessChromium, assert_not_blank
from PIL import Image
from pypdf import PdfReader
from report_data import HOSTILE, MARKUP, empty_month, hostile_month, month_of_traffic

from analytics import report

FIGURE_TITLES = [
    "Hits per hour and the 30-day baseline (UTC)",
    "Hits and unique visitors per day",
    "Hits by hour of day and weekday (UTC)",
    "Top 15 visitors: share of all hits",
    "Top 15 visitors by hits (hashed ids, shortened)",
    "Top paths",
    "Top referrers (by host)",
    "Month over month (labels: change on the previous month)",
    "Devices, browsers and operating systems (hits)",
]


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeadlessChromium]:
    browser = HeadlessChromium(tmp_path_factory.mktemp("chromium"))
    yield browser
    browser.close()


# --- figures -------------------------------------------------------------------


def test_figures_in_page_order():
    figures = report.build_figures(month_of_traffic())

    assert [figure.layout.title.text for figure in figures] == FIGURE_TITLES


def test_traffic_figure_has_the_baseline_band_and_anomaly_markers():
    data = month_of_traffic()

    traffic = report.traffic_figure(data)

    traces = {trace.name: trace for trace in traffic.data}
    band = traces["baseline band (5th-95th pct.)"]
    assert band.fill == "tonexty"  # filled down to the 5th percentile trace before it
    assert traffic.data[list(traces).index(band.name) - 1].y[200] == data["hourly"][200]["low"]
    assert band.y[200] == data["hourly"][200]["high"]
    # The first week has no baseline yet: a gap, not a zero band.
    assert band.y[0] is None
    assert list(traces["spikes (1)"].x) == ["2026-11-11 15:00:00"]
    assert list(traces["spikes (1)"].y) == [400]
    assert list(traces["drops (1)"].x) == ["2026-11-21 14:00:00"]
    assert len(traces["hits"].x) == 30 * 24
    assert isinstance(traces["hits"], go.Scatter)


def test_long_series_are_drawn_with_webgl():
    data = month_of_traffic()
    data["hourly"] = data["hourly"] * (report.WEBGL_MIN_POINTS // len(data["hourly"]) + 1)

    traffic = report.traffic_figure(data)

    assert all(isinstance(trace, go.Scattergl) for trace in traffic.data[:4])


def test_top_visitors_pie_shows_shares_of_all_hits():
    data = month_of_traffic()

    pie = report.top_visitors_pie(data).data[0]

    assert len(pie.labels) == 16 and pie.labels[-1] == "all other visitors"
    assert sum(pie.values) == data["summary"]["hits"]
    assert pie.values[0] == data["top_visitors"][0]["hits"]


def test_month_over_month_bars_are_labelled_with_growth():
    bars = report.monthly_figure(month_of_traffic()).data

    assert list(bars[0].x) == ["2026-09", "2026-10", "2026-11"]
    assert list(bars[0].text)[:2] == ["", "+20%"]
    assert list(bars[1].text)[1] == "+10%"


def test_no_figures_for_an_empty_month():
    assert report.build_figures(empty_month()) == []


# --- HTML ----------------------------------------------------------------------


@pytest.mark.slow
def test_html_report_opens_offline_in_chromium_without_errors(chromium, tmp_path):
    out = tmp_path / "report.html"
    report.write_report(month_of_traffic(), "html", out)

    chromium.open(out.as_uri())

    assert chromium.errors() == []
    assert chromium.evaluate("document.body.dataset.drawn") == str(len(FIGURE_TITLES))
    # One file: nothing is loaded from anywhere else.
    external = "[src], link[href]:not([href^='data:'])"
    assert chromium.evaluate(f"document.querySelectorAll({external!r}).length") == 0
    titles = chromium.evaluate(
        "Array.from(document.querySelectorAll('.gtitle')).map(t => t.textContent)"
    )
    assert titles == FIGURE_TITLES
    summary = chromium.evaluate("document.getElementById('summary').innerText")
    assert "Unique visitors\t9,000" in summary and "Peak hour\t14:00" in summary
    assert_not_blank(chromium.screenshot())


@pytest.mark.slow
def test_hostile_strings_are_shown_as_text(chromium, tmp_path):
    out = tmp_path / "report.html"
    report.write_report(hostile_month(), "html", out)

    chromium.open(out.as_uri())

    assert chromium.dialogs() == []
    assert chromium.errors() == []
    # Only the page's own scripts (HTML or SVG): the data block, plotly.js and report.js.
    assert chromium.evaluate("document.querySelectorAll('script').length") == 3
    shown = chromium.evaluate(
        "Array.from(document.querySelectorAll('h1, td, svg text'))"
        ".map(e => e.textContent).filter(t => t.includes('alert'))"
    )
    assert f"Traffic report for {HOSTILE}, 2026-11-01 to 2026-11-30" in shown  # the site
    assert shown.count(HOSTILE) >= 4  # site, path (twice in the affinity table), path label
    labels = chromium.evaluate(
        "Array.from(document.querySelectorAll('svg .ytick text, svg .slicetext'))"
        ".map(e => e.textContent)"
    )
    assert HOSTILE in labels  # the path on its bar chart
    assert MARKUP in labels  # the referrer: no bold, no line break, no link
    markup = "svg a, svg tspan[style*=bold]"
    assert chromium.evaluate(f"document.querySelectorAll({markup!r}).length") == 0
    assert any(label.startswith(HOSTILE) for label in labels if label != HOSTILE)  # browser pie


@pytest.mark.slow
def test_empty_month_says_there_is_no_data(chromium, tmp_path):
    out = tmp_path / "report.html"
    report.write_report(empty_month(), "html", out)

    chromium.open(out.as_uri())

    assert chromium.errors() == []
    assert chromium.evaluate("document.body.dataset.drawn") == "0"
    assert chromium.evaluate("document.getElementById('no-data').innerText") == (
        "No data for quiet.example from 2026-11-01 to 2026-11-30: "
        "no hits were recorded in this period."
    )


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown report format 'svg'"):
        report.write_report(month_of_traffic(), "svg", tmp_path / "report.svg")
    assert list(tmp_path.iterdir()) == []


# --- PNG and PDF ---------------------------------------------------------------


@pytest.mark.slow
def test_png_report_stacks_the_summary_and_every_figure(tmp_path):
    out = tmp_path / "report.png"

    report.write_report(month_of_traffic(), "png", out)

    png = out.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    heights = [figure.layout.height for figure in report.static_figures(month_of_traffic())]
    with Image.open(out) as picture:
        assert picture.size == (report.STATIC_WIDTH, sum(heights))
    assert_not_blank(png)


@pytest.mark.slow
def test_pdf_report_has_a_page_per_figure(tmp_path):
    out = tmp_path / "report.pdf"

    report.write_report(month_of_traffic(), "pdf", out)

    assert out.read_bytes().startswith(b"%PDF-")
    pages = PdfReader(out).pages
    assert len(pages) == 1 + len(FIGURE_TITLES)  # the summary table first
    assert "Traffic report for shop.example" in pages[0].extract_text()


@pytest.mark.slow
def test_pdf_of_an_empty_month_says_no_data(tmp_path):
    out = tmp_path / "report.pdf"

    report.write_report(empty_month(), "pdf", out)

    pages = PdfReader(out).pages
    assert len(pages) == 1
    assert "quiet.example, 2026-11-01 to 2026-11-30: no data" in pages[0].extract_text()


@pytest.mark.parametrize("fmt", ["png", "pdf"])
def test_png_and_pdf_without_chromium_fail_clearly(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))

    with pytest.raises(report.ChromiumNotFound, match="install Debian's `chromium` package"):
        report.write_report(month_of_traffic(), fmt, tmp_path / f"report.{fmt}")
    assert list(tmp_path.iterdir()) == []
