"""What a GGUF file's header says about the model in it, read with llama.cpp's own `gguf`
package (the header and tensor index only; the weights are never loaded)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GgufError(ValueError):
    """The file is missing, unreadable or not GGUF; the message names it."""


@dataclass(frozen=True)
class GgufFacts:
    path: str
    architecture: str
    fill_in_middle: bool  # it has the prefix, suffix and middle tokens /infill needs


# llama.cpp finds FIM tokens by metadata first, else by their text (llama-vocab.cpp keeps the
# same lists): a model qualifies for /infill when all three are found.
_FIM_KEYS = {
    "pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
}
_FIM_TEXTS = {
    "pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<\uff5cfim\u2581begin\uff5c>",
        "<PRE>",
        "\u2581<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<\uff5cfim\u2581hole\uff5c>",
        "<SUF>",
        "\u2581<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<\uff5cfim\u2581end\uff5c>",
        "<MID>",
        "\u2581<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
}

_cache: dict[tuple[str, int, int], GgufFacts] = {}


def read_facts(path: str | Path) -> GgufFacts:
    """The facts of one file; the same file (path, size, mtime) is read once per process."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise GgufError(f"{path}: cannot read: {exc.strerror or exc}") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        _cache[key] = _read(path)
    return _cache[key]


def _read(path: Path) -> GgufFacts:
    try:
        from gguf import GGUFReader  # imported here: only what reads files pays for numpy

        reader = GGUFReader(os.fspath(path), "r")
    except (ValueError, OSError) as exc:
        raise GgufError(f"{path}: not a GGUF model file ({exc})") from None
    fields: dict[str, Any] = reader.fields
    architecture = _scalar(fields, "general.architecture")
    return GgufFacts(
        path=str(path),
        architecture=str(architecture) if architecture is not None else "unknown",
        fill_in_middle=_has_fim(fields),
    )


def _scalar(fields: dict[str, Any], key: str) -> Any:
    field = fields.get(key)
    if field is None or not field.data:
        return None
    return field.contents()


def _has_fim(fields: dict[str, Any]) -> bool:
    found = {role for role, keys in _FIM_KEYS.items() if any(k in fields for k in keys)}
    if len(found) == len(_FIM_KEYS):
        return True
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return False
    texts = {bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data}
    found |= {role for role, names in _FIM_TEXTS.items() if texts.intersection(names)}
    return len(found) == len(_FIM_KEYS)
