"""Render the fpn-serve Grafana dashboard's panels from a live Prometheus into one PNG.

Reads the PromQL of every panel in ``deploy/grafana/dashboards/fpn-serve.json``, fills in the
dashboard's template variables, asks Prometheus' HTTP API for the data (``/api/v1/query_range``,
or ``/api/v1/query`` for instant table panels) and draws the panels on a grid with matplotlib,
headless. The README's picture of the dashboard (``docs/dashboard.png``) comes from this script,
run against the docker compose stack under load::

    python deploy/render_dashboard.py --prometheus-url http://127.0.0.1:9090 \
        --range 30m --out docs/dashboard.png

Needs matplotlib (the project's ``dev`` extra); everything else is the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "fpn-serve.json"

#: RE2 metacharacters; a model name is matched literally by escaping them.
_REGEX_META = set(r"\.+*?()|[]{}^$")
_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_LEFTOVER_VARIABLE = re.compile(r"\$\{?\w+|\[\[\w+")


@dataclass(frozen=True)
class Query:
    """One target of one panel, with the dashboard's template variables still in place."""

    panel_title: str
    panel_type: str
    ref_id: str
    expr: str
    legend: str
    instant: bool
    unit: str
    log_scale: bool


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``90s``, ``1m30s`` or ``2h``.

    >>> parse_duration("1m30s")
    90.0
    """
    if not _DURATION.match(text):
        raise ValueError(f"not a Prometheus duration: {text!r} (examples: 30s, 5m, 1h30m)")
    return float(sum(int(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(text)))


def format_duration(seconds: float) -> str:
    """A Prometheus duration for ``seconds``, rounded to whole seconds (at least ``1s``).

    >>> format_duration(90.4)
    '90s'
    """
    return f"{max(1, round(seconds))}s"


def model_regex(model: str | None) -> str:
    r"""The value that replaces ``$model`` inside ``model=~"$model"``.

    ``None`` means every model. A name is escaped so it matches itself only; the backslashes are
    doubled because the regex sits inside a PromQL string literal.

    >>> model_regex(None)
    '.*'
    >>> model_regex("mnist.v2")
    'mnist\\\\.v2'
    """
    if model is None:
        return ".*"
    return "".join("\\\\" + ch if ch in _REGEX_META else ch for ch in model)


def substitute(
    expr: str,
    *,
    model: str | None = None,
    rate_interval: str = "1m",
    interval: str | None = None,
    range_: str | None = None,
) -> str:
    """Fill in the dashboard's template variables in one PromQL expression.

    ``$model`` (also ``${model}``, ``${model:regex}``, ``[[model]]``) becomes :func:`model_regex`;
    ``$__rate_interval`` becomes ``rate_interval``; ``$__interval`` and ``$__range`` become
    ``interval`` and ``range_`` (defaulting to ``rate_interval``). A variable left over is an
    error, since Prometheus would reject the query anyway.

    >>> substitute('rate(x{model=~"$model"}[$__rate_interval])', rate_interval="30s")
    'rate(x{model=~".*"}[30s])'
    """
    for duration in (rate_interval, interval, range_):
        if duration is not None:
            parse_duration(duration)  # fail early on a bad CLI value
    values = {
        "model": model_regex(model),
        "__rate_interval": rate_interval,
        "__interval": interval or rate_interval,
        "__range": range_ or rate_interval,
    }
    out = expr
    # Longest names first, so $__rate_interval is not read as $__rate followed by text.
    for name in sorted(values, key=len, reverse=True):
        value = values[name]
        out = re.sub(r"\$\{" + re.escape(name) + r"(?::\w+)?\}", lambda _m, v=value: v, out)
        out = out.replace(f"[[{name}]]", value)
        out = re.sub(r"\$" + re.escape(name) + r"(?!\w)", lambda _m, v=value: v, out)
    leftover = _LEFTOVER_VARIABLE.search(out)
    if leftover:
        raise ValueError(f"unknown template variable {leftover.group(0)!r} in {expr!r}")
    return out


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, rows' nested panels included, rows themselves excluded."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    """All PromQL targets of a dashboard, in panel order."""
    queries = []
    for panel in iter_panels(dashboard):
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        scale = defaults.get("custom", {}).get("scaleDistribution", {}).get("type")
        for target in panel.get("targets", []):
            if not target.get("expr"):
                continue
            queries.append(
                Query(
                    panel_title=panel.get("title", ""),
                    panel_type=panel.get("type", ""),
                    ref_id=target.get("refId", ""),
                    expr=target["expr"],
                    legend=target.get("legendFormat", ""),
                    instant=bool(target.get("instant")) and not target.get("range", False),
                    unit=defaults.get("unit", ""),
                    log_scale=scale == "log",
                )
            )
    return queries


def template_variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The queries behind the dashboard's query variables, e.g. ``label_values(m, model)``."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            out.append(query)
    return out


def legend_text(legend: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format applied to one series' labels.

    >>> legend_text("p95 {{endpoint}}", {"endpoint": "predict"})
    'p95 predict'
    """
    if not legend or legend == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused a query."""


class Prometheus:
    """The two read endpoints of Prometheus' HTTP API that the dashboard needs."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        full = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(full, timeout=self.timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusError(f"{full}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise PrometheusError(f"cannot reach Prometheus at {self.url}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(
                f"Prometheus refused {params.get('query')!r}: "
                f"{body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]["result"]

    def query(self, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; each result has ``metric`` and ``value`` ``[t, "v"]``."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", params)

    def query_range(
        self, expr: str, *, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """Range query; each result has ``metric`` and ``values`` ``[[t, "v"], ...]``."""
        return self._get(
            "/api/v1/query_range",
            {
                "query": expr,
                "start": f"{start:.3f}",
                "end": f"{end:.3f}",
                "step": f"{step:g}",
            },
        )


@dataclass
class PanelData:
    title: str
    type: str
    unit: str
    log_scale: bool
    # (legend, times, values) for time series; heatmaps keep the bucket bound in the legend.
    series: list[tuple[str, list[float], list[float]]]
    # Rows of label values for tables.
    table: list[dict[str, str]]


def fetch_panels(
    prometheus: Prometheus,
    queries: Sequence[Query],
    *,
    start: float,
    end: float,
    step: float,
    model: str | None,
    rate_interval: str,
) -> list[PanelData]:
    """Query Prometheus for every target; one PanelData per panel, in dashboard order."""
    panels: dict[str, PanelData] = {}
    window = format_duration(end - start)
    for q in queries:
        expr = substitute(
            q.expr,
            model=model,
            rate_interval=rate_interval,
            interval=format_duration(step),
            range_=window,
        )
        panel = panels.setdefault(
            q.panel_title, PanelData(q.panel_title, q.panel_type, q.unit, q.log_scale, [], [])
        )
        if q.instant:
            for result in prometheus.query(expr, at=end):
                panel.table.append(dict(result["metric"]))
            continue
        for result in prometheus.query_range(expr, start=start, end=end, step=step):
            times = [float(t) for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]
            panel.series.append((legend_text(q.legend, result["metric"]), times, values))
    return list(panels.values())


def _bucket_bound(legend: str) -> float:
    try:
        return float(legend)
    except ValueError:
        return math.inf


def _heatmap(ax: Any, panel: PanelData) -> None:
    """Per-bucket rates from cumulative ``le`` buckets, drawn as time × bucket cells."""
    import numpy as np

    series = sorted(panel.series, key=lambda s: _bucket_bound(s[0]))
    times = sorted({t for _, ts, _ in series for t in ts})
    index = {t: i for i, t in enumerate(times)}
    cumulative = np.full((len(series), len(times)), np.nan)
    for row, (_, ts, vs) in enumerate(series):
        for t, v in zip(ts, vs, strict=True):
            cumulative[row, index[t]] = v
    counts = np.diff(np.nan_to_num(cumulative), axis=0, prepend=0.0).clip(min=0.0)
    x = [datetime.fromtimestamp(t) for t in times]
    image = ax.pcolormesh(x, np.arange(len(series)), counts, shading="nearest", cmap="viridis")
    labels = [legend for legend, _, _ in series]
    ax.set_yticks(np.arange(len(series)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_ylabel("bucket (le)")
    ax.figure.colorbar(image, ax=ax, label="samples/s")


def _table(ax: Any, panel: PanelData) -> None:
    ax.axis("off")
    columns = sorted({k for row in panel.table for k in row if k != "__name__"})
    rows = [[row.get(c, "") for c in columns] for row in panel.table]
    table = ax.table(cellText=rows, colLabels=columns, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)


def _timeseries(ax: Any, panel: PanelData) -> None:
    from matplotlib.ticker import PercentFormatter

    for legend, ts, vs in panel.series:
        ax.plot([datetime.fromtimestamp(t) for t in ts], vs, label=legend, linewidth=1.2)
    if panel.log_scale:
        ax.set_yscale("log")
    if panel.unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif panel.unit:
        ax.set_ylabel(
            {"s": "seconds", "reqps": "requests/s", "sci": "", "short": ""}.get(
                panel.unit, panel.unit
            )
        )
    if len(panel.series) <= 12:
        ax.legend(fontsize=7, loc="upper left")


def render(
    panels: Sequence[PanelData], out: Path, *, title: str, columns: int = 2, dpi: int = 110
) -> Path:
    """Draw the panels on one grid and write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(7.5 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_title(panel.title, fontsize=10, loc="left")
        has_data = bool(panel.table if panel.type == "table" else panel.series)
        if not has_data:
            ax.axis("off")
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif panel.type == "table":
            _table(ax, panel)
        else:
            if panel.type == "heatmap":
                _heatmap(ax, panel)
            else:
                _timeseries(ax, panel)
            locator = mdates.AutoDateLocator(maxticks=6)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="render_dashboard.py",
        description="Render the fpn-serve Grafana dashboard from a live Prometheus into a PNG.",
    )
    parser.add_argument(
        "--prometheus-url",
        default="http://127.0.0.1:9090",
        help="Prometheus base URL (default: %(default)s)",
    )
    parser.add_argument(
        "--dashboard",
        type=Path,
        default=DEFAULT_DASHBOARD,
        help="Grafana dashboard JSON (default: the provisioned one)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/dashboard.png"),
        help="PNG to write (default: %(default)s)",
    )
    parser.add_argument(
        "--range",
        dest="range_",
        default="30m",
        help="time range ending at --end, a Prometheus duration (default: 30m)",
    )
    parser.add_argument(
        "--end", type=float, default=None, help="end of the range, Unix seconds (default: now)"
    )
    parser.add_argument(
        "--step", default=None, help="resolution, a duration (default: range / 240, at least 1s)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="one model's name (default: all models, as the dashboard's 'All')",
    )
    parser.add_argument(
        "--rate-interval",
        default="1m",
        help="value of $__rate_interval, at least 4 scrape intervals (default: %(default)s)",
    )
    parser.add_argument(
        "--panel",
        action="append",
        default=[],
        help="only panels whose title contains this text (repeatable)",
    )
    parser.add_argument("--columns", type=int, default=2, help="grid columns (default: 2)")
    parser.add_argument("--dpi", type=int, default=110, help="PNG resolution (default: 110)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each Prometheus answer (default: 30)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        span = parse_duration(args.range_)
        step = parse_duration(args.step) if args.step else max(1.0, span / 240)
        substitute("", rate_interval=args.rate_interval)  # validates the duration
    except ValueError as exc:
        print(f"render_dashboard.py: {exc}", file=sys.stderr)
        return 2
    try:
        dashboard = json.loads(args.dashboard.read_text())
    except (OSError, ValueError) as exc:
        print(
            f"render_dashboard.py: cannot read dashboard {args.dashboard}: {exc}", file=sys.stderr
        )
        return 2
    queries = [
        q
        for q in dashboard_queries(dashboard)
        if not args.panel or any(p.lower() in q.panel_title.lower() for p in args.panel)
    ]
    if not queries:
        print("render_dashboard.py: no panel matches --panel", file=sys.stderr)
        return 2
    end = args.end if args.end is not None else time.time()
    try:
        panels = fetch_panels(
            Prometheus(args.prometheus_url, timeout=args.timeout),
            queries,
            start=end - span,
            end=end,
            step=step,
            model=args.model,
            rate_interval=args.rate_interval,
        )
    except PrometheusError as exc:
        print(f"render_dashboard.py: {exc}", file=sys.stderr)
        return 1
    title = f"{dashboard.get('title', 'dashboard')}: last {args.range_}"
    if args.model:
        title += f", model {args.model}"
    out = render(panels, args.out, title=title, columns=args.columns, dpi=args.dpi)
    print(f"render_dashboard.py: wrote {out} ({len(panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
