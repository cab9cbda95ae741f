"""What a request body costs beyond its bytes: its JSON object keys and array items, bounded
per request. llama-server's JSON parsing grows quadratically with keys it does not use (a
1.7 MB body of 100k keys took 70-100 s of its CPU), so a cheap body could hold a slot for
minutes. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from proxifier.errors import InvalidRequest


def over_limits(payload: Any, max_keys: int, max_items: int) -> InvalidRequest | None:
    """A 400 naming the limit the body passes (object keys, array items, counted over the
    whole body), or None. Stops counting as soon as one is passed."""
    keys = items = 0
    stack = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            keys += len(node)
            if keys > max_keys:
                return InvalidRequest(
                    f"The request body has more than {max_keys} JSON object keys "
                    "(settings.max_json_keys)"
                )
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            items += len(node)
            if items > max_items:
                return InvalidRequest(
                    f"The request body has more than {max_items} JSON array items "
                    "(settings.max_json_items)"
                )
            stack.extend(v for v in node if isinstance(v, dict | list))
    return None
