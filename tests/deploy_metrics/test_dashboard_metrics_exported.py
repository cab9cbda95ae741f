"""Every metric the Grafana dashboard queries is exported by the running product.

The product runs for real (Serve behind HAProxy, the controller, fake llama-servers, auth with
a rate-limited key), answers 200s, a 502 (a model that crashes, and is restarted), a 404 (an
unknown model), a 401 and a 429 (the rate limit), stops a model for idleness (an eviction),
and then both sources the dashboard reads are scraped: the product's `/metrics` and Ray's
metrics export on each node's metrics export port. Each name a panel or variable queries must
be a series one of them offers, and each label a query filters or groups on must be on that
family's samples. The product writes HELP/TYPE for every family
even before its first event, which would be enough for the names; the eviction and the crash
are caused anyway so that the labels of those families are checked too. Ray's export only
lists what was recorded, which the requests above take care of.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import deployed
from tests.deploy_metrics.dashboard import Query, load, queries
from tests.deploy_metrics.exposition import Family, by_series, families, merged
from tests.deploy_metrics.promql import grouping_labels, metric_names, selectors
from tests.helpers import wait_for

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OPS = {"Authorization": "Bearer k-ops"}  # admin, no rate limit
BURST = {"Authorization": "Bearer k-burst"}  # class "burst": one request a minute
AUTH = {
    "enabled": True,
    "api_keys": {
        "ops": {"key": "k-ops", "permissions": ["admin"]},
        "burst": {"key": "k-burst", "permissions": ["models"]},
    },
    "rate_limits": {"burst": 1},
}
# Labels Prometheus adds as it scrapes (KubeRay's PodMonitor adds ray_io_cluster): never in a
# scrape, so never required of one.
ADDED_BY_PROMETHEUS = frozenset({"ray_io_cluster", "job", "instance"})
# Ray exports what was recorded about every 10 s (README); a loaded 2-core machine is slower.
RAY_EXPORT_WAIT = 120.0
PRODUCT_WAIT = 60.0  # replicas push their counters to the controller every 2 s
# Serve's ingress counting a 429 of the product's app (the "Ray export" row's errors).
REJECTED = re.compile(
    r'^ray_serve_num_http_requests_total\{(?=[^}]*application="proxifier")'
    r'(?=[^}]*status_code="429")',
    re.M,
)


@dataclass(frozen=True)
class Scrapes:
    product: dict[str, Family]
    ray: dict[str, Family]
    ray_text: str

    def index(self) -> dict[str, Family]:
        return {**by_series(self.ray), **by_series(self.product)}


@pytest.fixture(scope="module")
def url(
    proxifier_home: Path,
    fake_server: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("deploy-metrics")
    fake = {"model_path": str(tiny_model), "llama_server": str(fake_server), "num_gpus": 0}
    (folder / "auth.yaml").write_text(yaml.safe_dump(AUTH))
    config = {
        # The controller's upkeep (idle stops among them) every second, not every 30 s.
        "settings": {"auth_file": "auth.yaml", "cleanup_interval": 1},
        "models": {
            "chat": {**fake, "preload": True},  # its load is timed: proxifier_model_load_seconds
            "crashy": {**fake, "env": {"FAKE_LLAMA_CRASH_AFTER": "0"}},  # 502, and a restart
            "idler": {**fake, "idle_timeout": 1},  # stopped for idleness: an eviction
        },
    }
    (folder / "models.yaml").write_text(yaml.safe_dump(config))
    with deployed(proxifier_home, folder / "models.yaml", ready="chat", headers=OPS) as (
        base,
        _controller,
    ):
        yield base


def polled(predicate: Callable[[], bool], every: float = 0.5) -> Callable[[], bool]:
    """`predicate` for wait_for, at most every `every` s: each try scrapes a whole export."""

    def check() -> bool:
        if predicate():
            return True
        time.sleep(every)
        return False

    return check


def ray_export() -> tuple[dict[str, Family], str]:
    """Ray's Prometheus export of every live node (each node's metrics agent serves its own),
    as families and as text."""
    import ray

    texts = []
    for node in ray.nodes():
        if node["Alive"]:
            address = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(httpx.get(address, timeout=10).text)
    return merged(*(families(text) for text in texts)), "\n".join(texts)


@pytest.fixture(scope="module")
def scrapes(url: str) -> Scrapes:
    with httpx.Client(base_url=url, timeout=60) as client:
        chat = "/v1/chat/completions"
        for model in ("chat", "idler"):
            answer = client.post(chat, json={"model": model, **CHAT}, headers=OPS)
            assert answer.status_code == 200, answer.text
        crashed = client.post(chat, json={"model": "crashy", **CHAT}, headers=OPS)
        assert crashed.status_code == 502, crashed.text
        unknown = client.post(chat, json={"model": "no-such-model", **CHAT}, headers=OPS)
        assert unknown.status_code == 404
        assert client.get("/v1/models").status_code == 401
        limited = [client.get("/v1/models", headers=BURST).status_code for _ in range(2)]
        assert limited == [200, 429]

    product: dict[str, Family] = {}

    def product_counted() -> bool:
        nonlocal product
        text = httpx.get(f"{url}/metrics", timeout=30).text
        product = families(text)
        # Every family with samples, so that its labels can be checked too.
        return (
            all(family.sampled for family in product.values())
            and 'proxifier_requests_total{model="chat",status="200"}' in text
            and 'proxifier_requests_total{model="crashy",status="502"}' in text
            and 'proxifier_evictions_total{reason="idle"}' in text
            and 'proxifier_rate_limited_total{key="burst"} 1.0' in text
        )

    # On a timeout the tests below say what is missing, which a bare TimeoutError would not.
    with contextlib.suppress(TimeoutError):
        wait_for(polled(product_counted), timeout=PRODUCT_WAIT)

    dashboard_names = {n for q in queries(load()) for n in metric_names(q.expr)}
    ray_names = {n for n in dashboard_names if n.startswith("ray_")}
    ray: dict[str, Family] = {}
    ray_text = ""

    def ray_exported() -> bool:
        nonlocal ray, ray_text
        ray, ray_text = ray_export()
        # The 429 too: Serve's own counter of the product's app has it.
        return ray_names <= set(by_series(ray)) and REJECTED.search(ray_text) is not None

    with contextlib.suppress(TimeoutError):
        wait_for(polled(ray_exported), timeout=RAY_EXPORT_WAIT)
    return Scrapes(product, ray, ray_text)


def unexported(found: list[Query], index: dict[str, Family]) -> list[str]:
    """Each query's names that neither scrape offers, as 'where: name'."""
    return [
        f"{query.where}: {name}"
        for query in found
        for name in sorted(metric_names(query.expr))
        if name not in index
    ]


def unknown_labels(found: list[Query], index: dict[str, Family]) -> list[str]:
    """Labels a query filters, groups or lists on that its families' samples lack. Families
    with no samples yet (no event so far) have unknown labels and are left out."""
    problems: list[str] = []
    for query in found:
        read = [(s, index.get(s.metric)) for s in selectors(query.expr)]
        for selector, family in read:
            if family is not None and family.sampled:
                for label in sorted(selector.labels - ADDED_BY_PROMETHEUS - family.labels):
                    problems.append(f"{query.where}: {selector.metric} has no label {label}")
        families_read = [family for _, family in read]
        if all(family is not None and family.sampled for family in families_read):
            offered = frozenset().union(*(f.labels for f in families_read if f is not None))
            wanted = grouping_labels(query.expr)
            if query.listed_label is not None:
                wanted.add(query.listed_label)
            for label in sorted(wanted - ADDED_BY_PROMETHEUS - offered):
                problems.append(f"{query.where}: no queried family has label {label}")
    return problems


def test_every_metric_the_dashboard_queries_is_exported(scrapes: Scrapes) -> None:
    missing = unexported(queries(load()), scrapes.index())
    assert not missing, "the dashboard queries metrics nothing exports:\n" + "\n".join(missing)


def test_every_label_the_dashboard_uses_is_on_the_metrics(scrapes: Scrapes) -> None:
    problems = unknown_labels(queries(load()), scrapes.index())
    assert not problems, "\n".join(problems)


def test_every_product_family_had_samples(scrapes: Scrapes) -> None:
    # Labels are only known from samples: a family without any would have its labels go
    # unchecked above, so the traffic must give every family of the product some.
    empty = sorted(name for name, family in scrapes.product.items() if not family.sampled)
    assert scrapes.product and not empty, empty


def test_the_sources_are_the_ones_the_panels_name(scrapes: Scrapes) -> None:
    # The product's names come from its /metrics, Ray's `ray_` names from Ray's export: the
    # README tells Prometheus to scrape both, and the panels say which one they read.
    names = {n for q in queries(load()) for n in metric_names(q.expr)}
    product, ray = by_series(scrapes.product), by_series(scrapes.ray)
    assert {n for n in names if not n.startswith("ray_")} <= set(product)
    assert {n for n in names if n.startswith("ray_")} <= set(ray)
    # Ray's export carries the product's ray.util.metrics, with the session label the
    # SessionName variable lists.
    requests = scrapes.ray.get("ray_proxifier_requests_total")
    assert requests is not None and "SessionName" in requests.labels


def test_a_rate_limit_rejection_reaches_the_rate_limit_panel(scrapes: Scrapes) -> None:
    # The gate refuses it before the proxy (proxifier_requests_total never counts it): the
    # panel reads the product's own counter, by key; Serve's ingress counts it too.
    limited = scrapes.product["proxifier_rate_limited_total"]
    assert limited.labels == {"key"}
    assert REJECTED.search(scrapes.ray_text), "no 429 of app 'proxifier' in Ray's export"


def test_the_check_fails_for_a_name_nothing_exports(scrapes: Scrapes) -> None:
    """The same check over the dashboard with one name misspelled (as a careless edit would)
    reports exactly that name: the test above cannot pass by checking nothing."""
    found = queries(load())
    broken: list[Query] = []
    for query in found:
        expr = query.expr.replace("proxifier_queue_depth{", "proxifier_queue_dept{")
        broken.append(Query(query.where, expr, query.panel, query.listed_label))
    index = scrapes.index()
    added = set(unexported(broken, index)) - set(unexported(found, index))
    assert added == {"panel 'Queue depth by model' target A: proxifier_queue_dept"}
