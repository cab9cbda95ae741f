"""A request body is bounded in what it costs, not only in bytes (proxifier.body_cost)."""

from __future__ import annotations

import json

from proxifier.body_cost import over_limits
from proxifier.config import Settings

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] * 50,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
}


def test_an_ordinary_request_is_far_inside_the_defaults() -> None:
    defaults = Settings()
    assert over_limits(CHAT, defaults.max_json_keys, defaults.max_json_items) is None


def test_a_body_of_unused_keys_is_refused_naming_the_limit() -> None:
    """The attack the issue measured: 100k keys in 1.7 MB, 70-100 s of llama-server's CPU."""
    flood = {**CHAT, "junk": {f"k{i}": 0 for i in range(100_000)}}
    assert len(json.dumps(flood)) < 2_000_000  # well under max_body_size: bytes alone let it in
    refused = over_limits(flood, Settings().max_json_keys, Settings().max_json_items)
    assert refused is not None and refused.status == 400
    assert (
        "more than 10000 JSON object keys" in refused.message and "max_json_keys" in refused.message
    )


def test_keys_and_items_are_counted_over_the_whole_body_at_any_depth() -> None:
    nested = {"a": [{"b": [1, 2, {"c": [3]}]}]}  # keys: a, b, c; items: 1 + 3 + 1
    assert over_limits(nested, max_keys=3, max_items=5) is None
    assert "keys" in over_limits(nested, max_keys=2, max_items=5).message  # type: ignore[union-attr]
    assert "array items" in over_limits(nested, max_keys=3, max_items=4).message  # type: ignore[union-attr]
