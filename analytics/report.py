"""The report: Plotly figures drawn from the analytics data (the dict
`analytics.figures.compute` returns), written as one self-contained HTML file,
a PNG or a PDF, and rendered as the page `GET /reports` serves (api/reports.py).

PNG and PDF are drawn by kaleido in a headless Chromium: Debian's `chromium`,
or the Chrome/Chromium binary named by the BROWSER_PATH environment variable.

Every string a visitor controls (paths, referrers, user agents, site names)
reaches the page in two ways, both escaped: in the HTML tables through Jinja's
autoescape, and in the figures as JSON inside a data block, where plotly.js
turns a little HTML (<b>, <a href>, <br>) into markup; so figure labels are
HTML-escaped too, and plotly.js shows them as the text they are.
"""

from __future__ import annotations

import asyncio
import html
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots
from plotly.utils import PlotlyJSONEncoder

FORMATS = ("html", "png", "pdf")
# Beyond this many points a line trace is drawn with WebGL (Scattergl): SVG
# with hundreds of thousands of elements makes the page crawl.
WEBGL_MIN_POINTS = 100_000
# Width of the PNG and PDF pages, in CSS pixels.
STATIC_WIDTH = 1100
TOP_VISITORS = 15

SPIKE_COLOUR = "#d62728"
DROP_COLOUR = "#1f77b4"
HITS_COLOUR = "#2a6f97"
VISITORS_COLOUR = "#f4a259"


class ChromiumNotFound(RuntimeError):
    """PNG and PDF need a Chrome or Chromium binary, and there is none."""


def build_figures(data: dict[str, Any]) -> list[go.Figure]:
    """The report's figures, in page order; none when the range has no hits."""
    if not data["summary"]["hits"]:
        return []
    return [
        traffic_figure(data),
        daily_figure(data),
        heatmap_figure(data),
        top_visitors_pie(data),
        top_visitors_bar(data),
        top_paths_figure(data),
        referrers_figure(data),
        monthly_figure(data),
        agents_figure(data),
    ]


def write_report(data: dict[str, Any], fmt: str, out: Path) -> None:
    """Write the report as `fmt` (html, png or pdf) to `out`, whole or not at all."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}: one of {', '.join(FORMATS)}")
    content = render_html(data).encode() if fmt == "html" else render_static(data, fmt)
    _write_atomically(Path(out), content)


# --- figures -----------------------------------------------------------------


def traffic_figure(data: dict[str, Any]) -> go.Figure:
    """Hits per hour against the 30-day baseline: the 5th-95th percentile band,
    the median, and the hours flagged as spikes or drops."""
    hourly = data["hourly"]
    hours = [_local_hour(row["hour"]) for row in hourly]
    line = _line_trace_type(len(hours))
    figure = go.Figure()
    figure.add_trace(
        line(
            x=hours, y=[row["low"] for row in hourly], name="baseline 5th percentile",
            mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip",
        )
    )  # fmt: skip
    figure.add_trace(
        line(
            x=hours, y=[row["high"] for row in hourly], name="baseline band (5th-95th pct.)",
            mode="lines", line={"width": 0}, fill="tonexty", fillcolor="rgba(42,111,151,0.18)",
        )
    )  # fmt: skip
    figure.add_trace(
        line(
            x=hours, y=[row["median"] for row in hourly], name="baseline median",
            mode="lines", line={"color": "#7a7a7a", "dash": "dot", "width": 1},
        )
    )  # fmt: skip
    figure.add_trace(
        line(
            x=hours, y=[row["hits"] for row in hourly], name="hits",
            mode="lines", line={"color": HITS_COLOUR, "width": 1.5},
        )
    )  # fmt: skip
    for direction, symbol, colour in (
        ("spike", "triangle-up", SPIKE_COLOUR),
        ("drop", "triangle-down", DROP_COLOUR),
    ):
        flagged = [a for a in data["anomalies"] if a["direction"] == direction]
        figure.add_trace(
            go.Scatter(
                x=[_local_hour(a["hour"]) for a in flagged],
                y=[a["hits"] for a in flagged],
                customdata=[[a["median"], a["score"]] for a in flagged],
                hovertemplate="%{x}<br>%{y} hits, median %{customdata[0]:.0f}"
                "<br>score %{customdata[1]:.1f}<extra>" + direction + "</extra>",
                name=f"{direction}s ({len(flagged)})",
                mode="markers",
                marker={"symbol": symbol, "size": 11, "color": colour},
            )
        )
    figure.update_layout(
        title=f"Hits per hour and the 30-day baseline ({data['timezone']})",
        yaxis_title="hits per hour",
    )
    return _styled(figure, height=430)


def daily_figure(data: dict[str, Any]) -> go.Figure:
    daily = data["daily"]
    days = [row["date"] for row in daily]
    figure = go.Figure()
    figure.add_bar(x=days, y=[row["hits"] for row in daily], name="hits", marker_color=HITS_COLOUR)
    figure.add_scatter(
        x=days, y=[row["visitors"] for row in daily], name="unique visitors",
        mode="lines+markers", line={"color": VISITORS_COLOUR, "width": 2},
    )  # fmt: skip
    figure.update_layout(title="Hits and unique visitors per day", xaxis_type="date")
    return _styled(figure, height=380)


def heatmap_figure(data: dict[str, Any]) -> go.Figure:
    heatmap = data["heatmap"]
    figure = go.Figure(
        go.Heatmap(
            z=heatmap["hits"],
            x=[f"{hour:02d}:00" for hour in heatmap["hours"]],
            y=heatmap["weekdays"],
            colorscale="Blues",
            colorbar={"title": {"text": "hits"}},
            hovertemplate="%{y} %{x}: %{z} hits<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"Hits by hour of day and weekday ({data['timezone']})",
        yaxis_autorange="reversed",
        xaxis_type="category",
    )
    return _styled(figure, height=360)


def top_visitors_pie(data: dict[str, Any]) -> go.Figure:
    """The top visitors' shares of all hits, the rest of the visitors as one slice."""
    top = data["top_visitors"]
    rest = max(data["summary"]["hits"] - sum(v["hits"] for v in top), 0)
    labels = [v["visitor"] for v in top] + ["all other visitors"]
    figure = go.Figure(
        go.Pie(
            labels=labels,
            values=[v["hits"] for v in top] + [rest],
            sort=False,
            direction="clockwise",
            textinfo="percent",
            textposition="inside",
            hovertemplate="%{label}: %{value} hits (%{percent})<extra></extra>",
        )
    )
    figure.update_layout(title=f"Top {TOP_VISITORS} visitors: share of all hits")
    return _styled(figure, height=420)


def top_visitors_bar(data: dict[str, Any]) -> go.Figure:
    top = data["top_visitors"]
    figure = go.Figure(
        go.Bar(
            x=[v["hits"] for v in top],
            y=[v["visitor"] for v in top],
            orientation="h",
            marker_color=HITS_COLOUR,
            text=[f"{v['share']:.1%}" for v in top],
            textposition="auto",
            hovertemplate="%{y}: %{x} hits (%{text})<extra></extra>",
        )
    )
    figure.update_layout(
        title=f"Top {TOP_VISITORS} visitors by hits (hashed ids, shortened)",
        yaxis={"autorange": "reversed", "type": "category"},
        xaxis_title="hits",
    )
    return _styled(figure, height=460)


def top_paths_figure(data: dict[str, Any]) -> go.Figure:
    paths = data["top_paths"]
    labels = [_label(p["path"]) for p in paths]
    figure = go.Figure()
    figure.add_bar(
        x=[p["hits"] for p in paths], y=labels, orientation="h", name="hits",
        marker_color=HITS_COLOUR,
    )  # fmt: skip
    figure.add_bar(
        x=[p["visitors"] for p in paths], y=labels, orientation="h", name="unique visitors",
        marker_color=VISITORS_COLOUR,
    )  # fmt: skip
    figure.update_layout(
        title="Top paths",
        barmode="group",
        yaxis={"autorange": "reversed", "type": "category", "automargin": True},
    )
    return _styled(figure, height=max(360, 28 * len(paths) + 140))


def referrers_figure(data: dict[str, Any]) -> go.Figure:
    referrers = data["referrers"]
    figure = go.Figure(
        go.Bar(
            x=[r["hits"] for r in referrers],
            y=[_label(r["host"]) for r in referrers],
            orientation="h",
            marker_color=HITS_COLOUR,
        )
    )
    figure.update_layout(
        title="Top referrers (by host)",
        yaxis={"autorange": "reversed", "type": "category", "automargin": True},
        xaxis_title="hits",
    )
    return _styled(figure, height=max(320, 26 * len(referrers) + 140))


def monthly_figure(data: dict[str, Any]) -> go.Figure:
    """Hits and visitors per month, each bar labelled with its change on the month before."""
    monthly = data["monthly"]
    months = [row["month"] for row in monthly]
    figure = go.Figure()
    for key, name, colour in (
        ("hits", "hits", HITS_COLOUR),
        ("visitors", "unique visitors", VISITORS_COLOUR),
    ):
        figure.add_bar(
            x=months,
            y=[row[key] for row in monthly],
            name=name,
            marker_color=colour,
            text=[_growth(row[f"{key}_growth"]) for row in monthly],
            textposition="outside",
        )
    figure.update_layout(
        title="Month over month (labels: change on the previous month)",
        barmode="group",
        xaxis_type="category",
    )
    return _styled(figure, height=380)


def agents_figure(data: dict[str, Any]) -> go.Figure:
    groups = (("devices", "Devices"), ("browsers", "Browsers"), ("os", "Operating systems"))
    figure = make_subplots(
        rows=1,
        cols=len(groups),
        specs=[[{"type": "domain"}] * len(groups)],
        subplot_titles=[title for _key, title in groups],
    )
    for column, (key, title) in enumerate(groups, start=1):
        figure.add_trace(
            go.Pie(
                labels=[_label(item["name"]) for item in data[key]],
                values=[item["hits"] for item in data[key]],
                name=title,
                hole=0.4,
                textinfo="label+percent",
                textposition="inside",
                showlegend=False,
            ),
            row=1,
            col=column,
        )
    figure.update_layout(title="Devices, browsers and operating systems (hits)")
    return _styled(figure, height=400)


def _styled(figure: go.Figure, height: int) -> go.Figure:
    figure.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 30, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.15},
    )
    return figure


def _line_trace_type(points: int) -> type[go.Scatter] | type[go.Scattergl]:
    return go.Scattergl if points > WEBGL_MIN_POINTS else go.Scatter


def _label(text: str | None) -> str:
    """A visitor-controlled string as plotly.js text that shows exactly that string."""
    return html.escape(text or "", quote=False)


def _local_hour(hour: str) -> str:
    """'2026-11-01T14:00:00+01:00' -> '2026-11-01 14:00:00': plotly.js date axes
    take wall-clock times; the figures are in the report's time zone already."""
    return hour[:19].replace("T", " ")


def _growth(value: float | None) -> str:
    return "" if value is None else f"{value:+.0%}"


# --- HTML --------------------------------------------------------------------


@dataclass(frozen=True)
class PageControls:
    """What the /reports form shows: the chosen month, range and site, and the sites to pick."""

    month: str
    start: str
    end: str
    site: str | None
    sites: Sequence[str]
    action: str = "/reports"
    token: str | None = None


@cache
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("analytics", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@cache
def asset(name: str) -> str:
    """The text of a report asset: plotly.min.js (from the plotly package),
    report.js or report.css (beside the template)."""
    if name == "plotly.min.js":
        return get_plotlyjs()
    return (files("analytics") / "templates" / name).read_text(encoding="utf-8")


def render_html(
    data: dict[str, Any],
    *,
    asset_url: str | None = None,
    controls: PageControls | None = None,
) -> str:
    """The report page. Without `asset_url`, one self-contained file (plotly.js,
    script and styles inline; opens offline). With it, scripts and styles are
    linked from `asset_url + name`, as on the page /reports serves, whose CSP
    allows no inline script."""
    figures = [figure.to_plotly_json() for figure in build_figures(data)]
    inline = None
    if asset_url is None:
        inline = {
            name: Markup(asset(name)) for name in ("plotly.min.js", "report.js", "report.css")
        }
    template = _templates().get_template("report.html.j2")
    return template.render(
        data=data,
        title=report_title(data),
        summary=data["summary"],
        summary_rows=summary_rows(data),
        # plotly's encoder turns numpy arrays and dates into JSON; tojson then escapes
        # <, >, & and ' so no string can end the data block.
        figures=_plain_json(figures),
        inline=inline,
        asset_url=asset_url,
        controls=controls,
    )


def _plain_json(value: Any) -> Any:
    return json.loads(json.dumps(value, cls=PlotlyJSONEncoder))


# --- PNG and PDF -------------------------------------------------------------


def find_chromium() -> str:
    """The browser kaleido drives: BROWSER_PATH if set, else `chromium` on PATH."""
    named = os.environ.get("BROWSER_PATH")
    found = named or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not os.access(found, os.X_OK):
        where = f"BROWSER_PATH={named!r} is not an executable" if named else "no chromium on PATH"
        raise ChromiumNotFound(
            f"PNG and PDF reports are drawn by Chromium, and {where}: install Debian's "
            "`chromium` package (or set BROWSER_PATH to a Chrome/Chromium binary), "
            "or ask for --format html"
        )
    return found


def static_figures(data: dict[str, Any]) -> list[go.Figure]:
    """What the PNG and PDF show: the summary as a table, then the figures."""
    summary = summary_table_figure(data)
    return [summary, *build_figures(data)] if data["summary"]["hits"] else [summary]


def render_static(data: dict[str, Any], fmt: str) -> bytes:
    """PNG: every figure stacked into one tall image. PDF: one page per figure."""
    browser = find_chromium()
    figures = static_figures(data)
    pages = asyncio.run(_draw(figures, fmt, browser))
    return _stack_png(pages) if fmt == "png" else _merge_pdf(pages)


async def _draw(figures: list[go.Figure], fmt: str, browser: str) -> list[bytes]:
    import kaleido

    # One browser for all figures; mathjax off: it would come from a CDN, and the
    # machine may be offline (plotly.js itself comes from the plotly package).
    async with kaleido.Kaleido(n=1, timeout=120, mathjax=False, path=browser) as drawer:
        return [
            await drawer.calc_fig(
                figure,
                opts={"format": fmt, "width": STATIC_WIDTH, "height": figure.layout.height},
            )
            for figure in figures
        ]


def _stack_png(images: list[bytes]) -> bytes:
    from PIL import Image

    pictures = [Image.open(io.BytesIO(image)).convert("RGB") for image in images]
    sheet = Image.new(
        "RGB",
        (max(p.width for p in pictures), sum(p.height for p in pictures)),
        "white",
    )
    top = 0
    for picture in pictures:
        sheet.paste(picture, (0, top))
        top += picture.height
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _merge_pdf(documents: list[bytes]) -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for document in documents:
        writer.append(io.BytesIO(document))
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def summary_table_figure(data: dict[str, Any]) -> go.Figure:
    rows = summary_rows(data)
    figure = go.Figure(
        go.Table(
            columnwidth=[1, 2],
            header={"values": ["", "value"], "align": "left", "fill_color": "#dde7ee"},
            cells={
                "values": [[name for name, _ in rows], [_label(value) for _, value in rows]],
                "align": "left",
                "height": 26,
            },
        )
    )
    title = report_title(data)
    if not data["summary"]["hits"]:
        title += ": no data"
    figure.update_layout(title=_label(title))
    return _styled(figure, height=160 + 28 * len(rows))


# --- shared by the HTML table and the static summary ---------------------------


def report_title(data: dict[str, Any]) -> str:
    site = data["site"] or "all sites"
    return f"Traffic report for {site}, {data['from']} to {data['to']}"


def summary_rows(data: dict[str, Any]) -> list[tuple[str, str]]:
    summary = data["summary"]
    peak = summary["peak_hour"]
    rows = [
        ("Site", data["site"] or "all sites"),
        ("Period", f"{data['from']} to {data['to']} ({data['timezone']})"),
        ("Hits", f"{summary['hits']:,}"),
        ("Unique visitors", f"{summary['visitors']:,}"),
        ("Hits per visitor", _number(summary["hits_per_visitor"], "{:.2f}")),
        ("Bot hits", _bot_hits(summary)),
        ("Peak hour", "n/a" if peak is None else f"{peak:02d}:00"),
        ("Anomalous hours", f"{summary['anomalies']:,}"),
        ("Bots", "included in the figures" if data["include_bots"] else "left out of the figures"),
    ]
    return rows


def _bot_hits(summary: dict[str, Any]) -> str:
    if summary["bot_share"] is None:
        return f"{summary['bot_hits']:,}"
    return f"{summary['bot_hits']:,} ({summary['bot_share']:.1%} of all hits)"


def _number(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _write_atomically(out: Path, content: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, out)
