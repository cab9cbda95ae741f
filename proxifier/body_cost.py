"""What a request body costs beyond its bytes: its JSON object keys and array items, bounded
per request. llama-server's JSON parsing grows quadratically with keys it does not use (a
1.7 MB body of 100k keys took 70-100 s of its CPU), so a cheap body could hold a slot for
minutes. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from proxifier.errors import InvalidRequest

# Per container kind: what the 400 calls it, and the setting that bounds it.
NAMES = {dict: ("JSON object keys", "max_json_keys"), list: ("JSON array items", "max_json_items")}


def over_limits(payload: Any, max_keys: int, max_items: int) -> InvalidRequest | None:
    """A 400 naming the limit the body passes (object keys, array items, counted over the
    whole body), or None. Stops counting as soon as one is passed."""
    limits = {dict: max_keys, list: max_items}
    counts = dict.fromkeys(limits, 0)
    stack = [payload] if isinstance(payload, dict | list) else []
    while stack:
        node = stack.pop()
        kind = dict if isinstance(node, dict) else list
        counts[kind] += len(node)
        if counts[kind] > limits[kind]:
            what, setting = NAMES[kind]
            return InvalidRequest(
                f"The request body has more than {limits[kind]} {what} (settings.{setting})"
            )
        children = node.values() if isinstance(node, dict) else node
        stack.extend(v for v in children if isinstance(v, dict | list))
    return None
