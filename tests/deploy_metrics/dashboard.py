"""The shipped Grafana dashboard and every PromQL query in it: panel targets and the queries of
its template variables (they read metrics too, and an empty variable empties every panel)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "proxifier.json"

# Grafana's variable query functions: the metric expression is their first argument.
LABEL_VALUES = re.compile(r"label_values\((?P<expr>.*),\s*(?P<label>[A-Za-z_]\w*)\s*\)", re.S)
LABEL_VALUES_BARE = re.compile(r"label_values\(\s*[A-Za-z_]\w*\s*\)")
QUERY_RESULT = re.compile(r"query_result\((?P<expr>.*)\)", re.S)


@dataclass(frozen=True)
class Query:
    where: str  # for messages: 'panel "Queue depth by model" target A', 'variable model'
    expr: str
    panel: dict[str, Any] | None  # None for a variable's query
    listed_label: str | None = None  # the label whose values `label_values(expr, label)` lists


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels a collapsed row keeps inside it included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_expr(variable: dict[str, Any]) -> tuple[str, str | None] | None:
    """The PromQL inside a query variable's `label_values(...)`/`query_result(...)` and the
    label it lists, or None for one that reads no metric (`label_values(job)`)."""
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, dict) else str(query or "")
    text = text.strip()
    if LABEL_VALUES_BARE.fullmatch(text):
        return None
    match = LABEL_VALUES.fullmatch(text)
    if match:
        return match.group("expr"), match.group("label")
    match = QUERY_RESULT.fullmatch(text)
    if match:
        return match.group("expr"), None
    raise ValueError(f"variable {variable.get('name')!r}: a query this check cannot read: {text!r}")


def queries(dashboard: dict[str, Any]) -> list[Query]:
    found: list[Query] = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            found.append(Query(where, target["expr"], panel))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            read = variable_expr(variable)
            if read is not None:
                found.append(Query(f"variable {variable['name']}", read[0], None, read[1]))
    return found
