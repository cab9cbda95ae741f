"""What a Prometheus scrape offers a query: the series names of each family and the labels seen.

Both of the dashboard's sources are read with it: the product's `/metrics` and Ray's metrics
export. A family without samples still counts as exported when its HELP/TYPE lines are there
(the product writes them for every family, samples or not), but then its labels are unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Family:
    """One exported family, named as `promql.family_of` names what a query reads."""

    name: str  # a counter as `x_total`, a histogram by its base name, anything else as is
    type: str
    series: frozenset[str]  # the names a query may use: `x_total`; `x_bucket`, `x_sum`, `x_count`
    labels: frozenset[str]  # label names seen on its samples (none when it has no samples)
    sampled: bool


def families(text: str) -> dict[str, Family]:
    """The families of one scrape, by the name `promql.family_of` gives their series."""
    found: dict[str, Family] = {}
    for metric in text_string_to_metric_families(text):
        # prometheus_client's parser names a counter family without `_total`; its samples,
        # and so every query, carry the suffix.
        base = metric.name
        if metric.type == "counter":
            name, series = f"{base}_total", {f"{base}_total"}
        elif metric.type == "histogram":
            name, series = base, {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif metric.type == "summary":
            name, series = base, {base, f"{base}_sum", f"{base}_count"}
        else:
            name, series = base, {base}
        # `_created` samples (OpenMetrics) are series too, but not ones a dashboard charts.
        series |= {s.name for s in metric.samples if not s.name.endswith("_created")}
        labels = frozenset(label for sample in metric.samples for label in sample.labels)
        found[name] = Family(name, metric.type, frozenset(series), labels, bool(metric.samples))
    return found


def by_series(exported: dict[str, Family]) -> dict[str, Family]:
    """Each series name a query can read from these families, and its family."""
    return {name: family for family in exported.values() for name in family.series}


def merged(*scrapes: dict[str, Family]) -> dict[str, Family]:
    """The families of several scrapes (one per Ray node) as one: series and labels united."""
    result: dict[str, Family] = {}
    for scrape in scrapes:
        for name, family in scrape.items():
            seen = result.get(name)
            if seen is None:
                result[name] = family
            else:
                result[name] = Family(
                    name,
                    seen.type,
                    seen.series | family.series,
                    seen.labels | family.labels,
                    seen.sampled or family.sampled,
                )
    return result
