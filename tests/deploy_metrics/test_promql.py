"""The PromQL scanner the dashboard checks rest on: a name it missed would go unchecked, a word
it took for a name would fail them for nothing. No Ray here."""

from __future__ import annotations

import re

import pytest

from tests.deploy_metrics.dashboard import load, queries, variable_expr
from tests.deploy_metrics.promql import (
    Selector,
    family_of,
    grouping_labels,
    metric_names,
    selectors,
)

CASES: list[tuple[str, set[str]]] = [
    ("up", {"up"}),
    ("proxifier_in_flight", {"proxifier_in_flight"}),
    ('proxifier_queue_depth{model=~"$model"}', {"proxifier_queue_depth"}),
    # functions and aggregations, clause after and clause first
    ("sum(rate(a_total[5m])) by (model)", {"a_total"}),
    ("sum by (model, status) (rate(a_total[5m]))", {"a_total"}),
    ("sum without (instance) (a)", {"a"}),
    ("count by (state) (proxifier_model_state == 1)", {"proxifier_model_state"}),
    # a by-list's words are labels, even one spelled like a metric
    ("sum by (up) (b)", {"b"}),
    # two metrics around binary operators, vector matching, bool, set operators
    ("a_sum / b_count", {"a_sum", "b_count"}),
    ("a / on() (sum(b) or vector(0))", {"a", "b"}),
    ("a * on (model) group_left (kind) b", {"a", "b"}),
    ("a * ignoring (le) group_right c", {"a", "c"}),
    ("a > bool 0.5 and b unless c", {"a", "b", "c"}),
    # histogram_quantile and its number, `le` in the by-list
    (
        'histogram_quantile(0.95, sum by (model, le) (rate(x_bucket{model=~"$model"}[5m])))',
        {"x_bucket"},
    ),
    # range selectors, Grafana's interval macros, subqueries, offset and @
    ("rate(a[$__rate_interval])", {"a"}),
    ("increase(a[1h]) offset 5m", {"a"}),
    ("max_over_time(rate(a[5m])[1h:1m])", {"a"}),
    ("a @ end()", {"a"}),
    ("a @ 1609746000", {"a"}),
    # label values with braces, quotes, commas and operators in them are not names
    ('a{status!~"2..", le="+Inf", route!~"/-/.*"}', {"a"}),
    ("a{x='}{', y=`b{c}`}", {"a"}),
    ('a{model=~"$model",ray_io_cluster=~"${Cluster}"}', {"a"}),
    # template variables outside braces, and Grafana's old [[var]]
    ("a * $scale", {"a"}),
    ("a * ${scale:raw} + b[[interval]]", {"a", "b"}),
    # strings as function arguments
    ('label_replace(a, "dst", "$1", "src", "(up|down)")', {"a"}),
    ('count_values("version", build_info)', {"build_info"}),
    # numbers and keyword-like words
    ("a + 1e3 - 0x1F * .5 + Inf + NaN", {"a"}),
    # recording-rule names with colons
    ("job:requests:rate5m", {"job:requests:rate5m"}),
    ("", set()),
]


@pytest.mark.parametrize(("expr", "names"), CASES)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_selectors_keep_their_label_names_and_grouping_labels_are_separate() -> None:
    expr = (
        'sum by (model, le) (rate(x_bucket{model=~"$model",SessionName=~"$s"}[5m]))'
        ' / on (model) group_left y{kind="measured"}'
    )
    assert selectors(expr) == [
        Selector("x_bucket", frozenset({"model", "SessionName"})),
        Selector("y", frozenset({"kind"})),
    ]
    assert grouping_labels(expr) == {"model", "le"}


@pytest.mark.parametrize(
    "expr",
    [
        '{__name__=~"ray_serve_(http|grpc)_request_latency_ms_bucket"}',
        'sum(rate({__name__="a", x="y"}[5m]))',
        'a{__name__="b"}',
    ],
)
def test_a_name_it_cannot_resolve_is_an_error_not_a_miss(expr: str) -> None:
    with pytest.raises(ValueError):
        selectors(expr)


@pytest.mark.parametrize(
    "expr", ['a{x="y"', "sum(rate(a[5m])", 'a{x=~"y}', "a{x}", "a{x=y}", "a[5m"]
)
def test_malformed_queries_are_errors(expr: str) -> None:
    with pytest.raises(ValueError):
        selectors(expr)


@pytest.mark.parametrize(
    ("series", "family"),
    [
        ("proxifier_queue_wait_seconds_bucket", "proxifier_queue_wait_seconds"),
        ("proxifier_model_load_seconds_sum", "proxifier_model_load_seconds"),
        ("proxifier_model_load_seconds_count", "proxifier_model_load_seconds"),
        ("proxifier_requests_total", "proxifier_requests_total"),
        ("proxifier_in_flight", "proxifier_in_flight"),
    ],
)
def test_family_of(series: str, family: str) -> None:
    assert family_of(series) == family


def test_variable_queries_are_read_through_grafanas_functions() -> None:
    def var(query: str) -> dict[str, object]:
        return {"name": "v", "type": "query", "query": {"query": query}}

    assert variable_expr(var('label_values(a{x=~"$y"}, model)')) == ('a{x=~"$y"}', "model")
    assert variable_expr(var("query_result(count by (s) (b))")) == ("count by (s) (b)", None)
    assert variable_expr(var("label_values(job)")) is None
    with pytest.raises(ValueError):
        variable_expr(var("metrics(proxifier_.*)"))


# An independent, cruder reading of the shipped dashboard: every word that looks like one of
# the names it charts (outside strings, not a function) must be among the scanner's names.
NAME_LIKE = re.compile(r"\b(?:proxifier|ray)_[A-Za-z0-9_:]*\b(?!\s*\()")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def test_the_scanner_misses_no_name_of_the_shipped_dashboard() -> None:
    found = queries(load())
    assert len(found) >= 20
    for query in found:
        crude = set(NAME_LIKE.findall(STRING.sub('""', query.expr)))
        # `ray_io_cluster` is a label (Prometheus adds it), never a metric.
        crude.discard("ray_io_cluster")
        names = metric_names(query.expr)
        assert crude <= names, (query.where, crude - names)
        assert names, query.where
