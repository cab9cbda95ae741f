"""deploy/grafana/proxifier.json as a file: an importable dashboard whose variables are defined,
whose panels say which source they read and filter it as Ray's own dashboards do, and which
charts every family the product's /metrics exports. No Ray here; the test beside it checks the
names against a running product."""

from __future__ import annotations

import re
from typing import Any

import pytest

from proxifier.metrics import METRICS
from serve_app.metrics import render
from tests.deploy_metrics.dashboard import Query, load, panels, queries
from tests.deploy_metrics.exposition import families
from tests.deploy_metrics.promql import family_of, metric_names, selectors

# Grafana's own macros; any other `$name` must be a variable of the dashboard.
GRAFANA_MACROS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s"}
VARIABLE_USE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))|\[\[(\w+)\]\]")
PRODUCT_SOURCE = "Source: the product's GET /metrics"
RAY_SOURCE = "Source: Ray's metrics export"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load()


def test_an_importable_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "proxifierDashboard" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard.get("id") is None  # Grafana gives an imported dashboard its own id
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_variables_are_ray_dashboards_and_all_defined(dashboard: dict[str, Any]) -> None:
    variables = dashboard["templating"]["list"]
    names = [variable["name"] for variable in variables]
    # As Ray's dashboards name them: a Prometheus data source, the Ray session, the cluster
    # (label ray_io_cluster), the Serve application; and the product's own model.
    assert {"datasource", "SessionName", "Cluster", "Application", "model"} <= set(names)
    source = next(v for v in variables if v["name"] == "datasource")
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for query in queries(dashboard):
        used = {next(g for g in m if g) for m in VARIABLE_USE.findall(query.expr)}
        unknown = used - set(names) - GRAFANA_MACROS
        assert not unknown, (query.where, unknown)
        if query.panel is None:  # a variable may only use those defined before it
            own = query.where.removeprefix("variable ")
            assert used <= set(names[: names.index(own)]), (query.where, used)


def _source_checked(query: Query) -> None:
    """Ray's export is filtered by Ray session and cluster, the product's /metrics (which has
    no session label) by cluster only; every panel says which one it reads."""
    assert query.panel is not None
    description = query.panel["description"]
    for selector in selectors(query.expr):
        assert "ray_io_cluster" in selector.labels, (query.where, selector.metric)
        if selector.metric.startswith("ray_"):
            assert RAY_SOURCE in description, query.where
            assert "SessionName" in selector.labels, (query.where, selector.metric)
        else:
            assert PRODUCT_SOURCE in description, query.where
            assert "SessionName" not in selector.labels, (query.where, selector.metric)


def test_each_panel_states_its_source_and_filters_it(dashboard: dict[str, Any]) -> None:
    for query in queries(dashboard):
        if query.panel is not None:
            _source_checked(query)


def test_every_family_the_product_exports_is_charted(dashboard: dict[str, Any]) -> None:
    # The product writes every family's HELP/TYPE even with nothing to count, so an empty
    # snapshot lists them all.
    text = render({"statuses": [], "replicas": [], "load_seconds": {}, "evictions": {}})
    exported = set(families(text.decode()))
    # METRICS names the families as the dashboard check does (counters with _total).
    assert exported == set(METRICS)
    charted = {family_of(name) for q in queries(dashboard) for name in metric_names(q.expr)}
    assert exported <= charted, exported - charted
