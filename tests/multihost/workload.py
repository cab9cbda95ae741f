"""What the scenarios ask of the product: one short chat request, and the models of the
host-loss scenarios (one either worker may hold, one pinned to each)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.multihost.cluster import ProductOnHosts

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ANYWHERE_AND_PINNED: dict[str, dict[str, Any]] = {
    "anywhere": {"num_gpus": 1, "priority": 8},  # either worker's one GPU
    "pin-w1": {"num_gpus": 0, "labels": {"host": "w1"}},
    "pin-w2": {"num_gpus": 0, "labels": {"host": "w2"}},
}


def ask(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, **CHAT})


def warm_and_find(product: ProductOnHosts, http: httpx.Client) -> tuple[str, str, str]:
    """Every model answers once: (the content an answer carries, the worker "anywhere" runs
    on, the other worker)."""
    warm = {model: ask(http, model) for model in ANYWHERE_AND_PINNED}
    assert {m: a.status_code for m, a in warm.items()} == dict.fromkeys(ANYWHERE_AND_PINNED, 200)
    victim = product.where(http, "anywhere")
    assert victim in ("w1", "w2"), product.models(http)
    expected = warm["anywhere"].json()["choices"][0]["message"]["content"]
    return expected, victim, "w2" if victim == "w1" else "w1"
