"""The Grafana dashboard: SPEC §10 panels, built on SPEC §8 metric names only."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

# PromQL words that are not metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (strings, matchers, ranges and labels removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0) not in KEYWORDS:
            names.add(match.group(0))
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def all_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [e for p in panels(dashboard) for e in exprs(p)]


def find_panels(dashboard, *, type_=None, uses=None, grouped_by=None, quantiles=()):
    """Panels of ``type_`` whose queries select ``uses`` with every quantile in ``quantiles``."""
    found = []
    for panel in panels(dashboard):
        if type_ and panel["type"] != type_:
            continue
        queries = exprs(panel)
        if uses and not any(uses in metric_names(e) for e in queries):
            continue
        if grouped_by and not all(re.search(rf"by \([^)]*\b{grouped_by}\b", e) for e in queries):
            continue
        got = {float(q) for e in queries for q in re.findall(r"histogram_quantile\(([\d.]+)", e)}
        if not set(quantiles) <= got:
            continue
        found.append(panel)
    return found


def test_metric_name_extraction():
    expr = (
        "histogram_quantile(0.95, sum by (le, endpoint) (rate(fpn_request_duration_seconds_bucket"
        '{model=~"$model", code!~"5.."}[$__rate_interval]))) / on (model) group_left '
        "sum(fpn_samples_total) > 1e-9 or vector(0)"
    )
    assert metric_names(expr) == {"fpn_request_duration_seconds_bucket", "fpn_samples_total"}
    assert metric_names("sum(rate(fpn_request_latency_seconds_bucket[5m])) + up") == {
        "fpn_request_latency_seconds_bucket",
        "up",
    }


def test_dashboard_identity(dashboard):
    assert dashboard["uid"] == "fpn-serve"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)


def test_every_panel_has_a_promql_target(dashboard):
    assert len(panels(dashboard)) >= 10
    for panel in panels(dashboard):
        assert exprs(panel), f"panel {panel['title']!r} has no PromQL target"


def test_only_spec_metric_names_are_used(dashboard, spec_series):
    for expr in all_exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= spec_series, f"not a SPEC §8 metric: {names - spec_series} in {expr!r}"


def test_every_spec_metric_is_on_the_dashboard(dashboard, spec_metrics):
    used = {n for e in all_exprs(dashboard) for n in metric_names(e)}
    for name in spec_metrics:
        assert any(u == name or u.rsplit("_", 1)[0] == name for u in used), name


def test_spec_section_10_panels_exist(dashboard):
    assert find_panels(dashboard, type_="heatmap", uses="fpn_solver_iterations_bucket")
    assert find_panels(
        dashboard, type_="timeseries", uses="fpn_solver_iterations_bucket", quantiles=(0.5, 0.95)
    )
    assert find_panels(
        dashboard,
        uses="fpn_request_duration_seconds_bucket",
        grouped_by="endpoint",
        quantiles=(0.5, 0.95, 0.99),
    )
    assert find_panels(dashboard, uses="fpn_requests_total", grouped_by="code")
    nonconverged = find_panels(dashboard, uses="fpn_solver_nonconverged_total")
    assert nonconverged and any(
        {"fpn_solver_nonconverged_total", "fpn_samples_total"} <= metric_names(e)
        for p in nonconverged
        for e in exprs(p)
    ), "non-converged rate: non-converged samples over all samples"
    assert find_panels(dashboard, uses="fpn_batch_size_bucket")
    assert find_panels(dashboard, uses="fpn_queue_depth")
    queue_vs_solve = [
        p
        for p in find_panels(dashboard, uses="fpn_queue_duration_seconds_bucket")
        if any("fpn_solve_duration_seconds_bucket" in metric_names(e) for e in exprs(p))
    ]
    assert queue_vs_solve, "queue time and solve time belong on one panel"
    assert find_panels(dashboard, uses="fpn_solver_residual_bucket")
    assert find_panels(dashboard, type_="table", uses="fpn_model_info")


def test_heatmap_reads_prometheus_buckets(dashboard):
    for panel in find_panels(dashboard, type_="heatmap"):
        for target in panel["targets"]:
            assert target["format"] == "heatmap"
            assert re.search(r"sum by \(le\)", target["expr"])
        assert panel["options"]["calculate"] is False


def test_model_variable_filters_every_query(dashboard):
    [variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert variable["type"] == "query"
    assert variable["definition"] == "label_values(fpn_model_info, model)"
    assert variable["query"]["query"] == "label_values(fpn_model_info, model)"
    assert variable["includeAll"] is True and variable["allValue"] == ".*"
    for expr in all_exprs(dashboard):
        selectors = re.findall(r"(fpn_\w+)(\{[^}]*\})?", expr)
        for name, matchers in selectors:
            assert 'model=~"$model"' in matchers, f"{name} is not filtered by $model in {expr}"


def test_rates_use_the_rate_interval(dashboard):
    for expr in all_exprs(dashboard):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", f"fixed window [{window}] in {expr}"


def test_datasource_is_the_provisioned_uid(dashboard, repo_root):
    provisioned = yaml.safe_load(
        (repo_root / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == {"type": "prometheus", "uid": uid}


def test_panels_fit_the_grid_without_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_expression_parses_as_promql(dashboard, render_dashboard, tmp_path, tool):
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = [
        {"record": f"fpn:dashboard_query_{i}", "expr": render_dashboard.substitute(e)}
        for i, e in enumerate(all_exprs(dashboard))
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # And the check does reject a broken expression.
    rules_file.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum by (le (x)"}]}]}
        )
    )
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
