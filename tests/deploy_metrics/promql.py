"""The metric names a PromQL expression reads, and the label names its selectors match on.

Not a PromQL parser: a scanner that knows which tokens cannot be metric names (functions and
aggregations, by/without/on/ignoring/group_* clauses and their label lists, label matchers,
range and subquery brackets, strings, numbers and durations, keywords, Grafana's `$variables`)
and takes every other identifier for a metric. That is enough for a dashboard's queries, and
it errs loudly (ValueError) where it cannot know the name (`{__name__=~"..."}`), so that a
dashboard check built on it never passes by missing a query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Numbers, durations (5m, 1h30m) and hex: never names. A leading digit or dot starts one.
NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?(?:[smhdwy]|ms)*)+")
# Grafana's variables: $name, ${name}, ${name:format}, and the old [[name]] (a bracket, below).
VARIABLE = re.compile(r"\$(?:\{[^}]*\}|[A-Za-z0-9_]+)")
MATCH_OPERATOR = re.compile(r"\s*(=~|!~|!=|=)\s*")

# Followed by a parenthesized list of label names, not of expressions.
LABEL_LIST_CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Words that are neither functions nor metrics where they stand (group_left also goes bare).
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "group_left", "group_right"}
)
# What follows an aggregation's name in `sum by (model) (x)`, the clause-first form.
GROUPING = frozenset({"by", "without"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Selector:
    """One metric a query reads, and the label names its `{...}` matches on."""

    metric: str
    labels: frozenset[str]


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in `expr`, in order of appearance."""
    return _scan(expr)[0]


def grouping_labels(expr: str) -> set[str]:
    """The label names of `expr`'s by/without/on/ignoring/group_left/group_right lists."""
    return _scan(expr)[1]


def _scan(expr: str) -> tuple[list[Selector], set[str]]:
    found: list[Selector] = []
    grouping: set[str] = set()
    depth = 0
    i, n = 0, len(expr)
    while i < n:
        char = expr[i]
        if char.isspace():
            i += 1
        elif char in "\"'`":
            i = _skip_string(expr, i)
        elif char == "[":
            i = _skip_brackets(expr, i)  # a range, a subquery, or Grafana's old [[variable]]
        elif char == "$":
            match = VARIABLE.match(expr, i)
            i = match.end() if match else i + 1
        elif char == "{":
            # A selector without a metric name: only `{__name__=...}` makes one, and then the
            # name is a pattern this scanner cannot resolve. Refuse rather than miss it.
            matched, _ = _matchers(expr, i)
            raise ValueError(f"a selector without a metric name ({sorted(matched)}): {expr!r}")
        elif char.isdigit() or (char == "." and i + 1 < n and expr[i + 1].isdigit()):
            match = NUMBER.match(expr, i)
            i = match.end() if match and match.end() > i else i + 1
        elif IDENT.match(expr, i):
            match = IDENT.match(expr, i)
            assert match is not None
            word, i = match.group(), match.end()
            after = _skip_space(expr, i)
            called = after < n and expr[after] == "("
            following = IDENT.match(expr, after)
            grouped = following is not None and following.group() in GROUPING
            if word in LABEL_LIST_CLAUSES and called:
                # `by (model, le)`: label names, not metrics
                end = _skip_parens(expr, after)
                grouping.update(LABEL.findall(expr[after + 1 : end - 1]))
                i = end
            elif called or grouped or word.lower() in KEYWORDS:
                continue  # a function or aggregation (its arguments are scanned next) or keyword
            else:
                labels: frozenset[str] = frozenset()
                if after < n and expr[after] == "{":
                    labels, i = _matchers(expr, after)
                if "__name__" in labels:
                    raise ValueError(f"a __name__ matcher on {word!r} hides names: {expr!r}")
                found.append(Selector(word, labels))
        else:
            # An operator, a comma, a parenthesis: only parentheses are counted, so that a
            # query cut short fails here rather than reads as a shorter one.
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth < 0:
                raise ValueError(f"unbalanced () in {expr!r}")
            i += 1
    if depth:
        raise ValueError(f"unbalanced () in {expr!r}")
    return found, grouping


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` reads, as written (`x_bucket`, `y_total`)."""
    return {selector.metric for selector in selectors(expr)}


def family_of(series: str) -> str:
    """The family a queried series belongs to, named as the checks compare families:
    `_bucket`, `_sum` and `_count` map to the histogram's base name; a counter's `_total` stays
    (its family is compared as `name_total`, see `exposition.families`)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def _skip_space(expr: str, i: int) -> int:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return i


def _skip_string(expr: str, i: int) -> int:
    quote, i = expr[i], i + 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
        elif expr[i] == quote:
            return i + 1
        else:
            i += 1
    raise ValueError(f"unterminated string in {expr!r}")


def _skip_balanced(expr: str, i: int, open_: str, close: str) -> int:
    depth = 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _skip_string(expr, i)
            continue
        if char == open_:
            depth += 1
        elif char == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_}{close} in {expr!r}")


def _skip_brackets(expr: str, i: int) -> int:
    return _skip_balanced(expr, i, "[", "]")


def _skip_parens(expr: str, i: int) -> int:
    return _skip_balanced(expr, i, "(", ")")


def _matchers(expr: str, i: int) -> tuple[frozenset[str], int]:
    """The label names of the matchers in the `{...}` at `i`, and the index after it."""
    labels: set[str] = set()
    i += 1
    while True:
        i = _skip_space(expr, i)
        if i >= len(expr):
            raise ValueError(f"unterminated label matchers in {expr!r}")
        if expr[i] == "}":
            return frozenset(labels), i + 1
        if expr[i] == ",":
            i += 1
            continue
        label = LABEL.match(expr, i)
        if label is None:
            raise ValueError(f"bad label matcher at {expr[i:]!r}")
        operator = MATCH_OPERATOR.match(expr, label.end())
        if operator is None:
            raise ValueError(f"no match operator after label {label.group()!r} in {expr!r}")
        value = _skip_space(expr, operator.end())
        if value >= len(expr) or expr[value] not in "\"'`":
            raise ValueError(f"label {label.group()!r} is not matched against a string: {expr!r}")
        labels.add(label.group())
        i = _skip_string(expr, value)
