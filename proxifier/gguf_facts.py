"""What a GGUF file's header says about the model in it, read with llama.cpp's own `gguf`
package (the header and tensor index only; the weights are never loaded). Its only I/O is
reading that header; no Ray.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GgufError(ValueError):
    """The file is missing, unreadable or not GGUF; the message names it."""


@dataclass(frozen=True)
class GgufFacts:
    """What the header says; sizes in bytes. `layer_bytes[i]` is block i's weights (`blk.i.*`),
    `output_bytes` the output layer's (its own matrix, or the token embeddings it shares,
    which llama.cpp copies to the output's device), `input_bytes` what stays on the CPU."""

    path: str
    architecture: str
    fill_in_middle: bool  # it has the prefix, suffix and middle tokens /infill needs
    block_count: int = 0
    embedding_length: int = 0
    head_count: int = 0
    head_count_kv: tuple[int, ...] = ()  # per block
    key_length: int = 0  # per head
    value_length: int = 0
    context_length: int = 0  # trained: llama-server's -c when the config sets none
    vocab_size: int = 0
    layer_bytes: tuple[int, ...] = ()
    output_bytes: int = 0
    input_bytes: int = 0
    file_bytes: int = 0


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
    arch = str(_scalar(fields, "general.architecture") or "unknown")

    def number(key: str, default: int = 0) -> int:
        value = _scalar(fields, f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values: the largest one
            value = max(value, default=default)
        return int(value) if value is not None else default

    blocks = number("block_count")
    embedding, heads = number("embedding_length"), number("attention.head_count")
    kv_heads = _scalar(fields, f"{arch}.attention.head_count_kv")
    if isinstance(kv_heads, list):
        per_block = tuple(int(h) for h in kv_heads)
    else:
        per_block = (int(kv_heads) if kv_heads is not None else heads,) * blocks
    head_size = embedding // heads if heads else 0
    layers = [0] * blocks
    named: dict[str, int] = {}
    for tensor in [t for shard in _shards(path, reader) for t in shard.tensors]:
        size = int(tensor.n_bytes)
        parts = tensor.name.split(".")
        if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < blocks:
            layers[int(parts[1])] += size
        else:
            named[tensor.name] = named.get(tensor.name, 0) + size
    # llama.cpp's output layer: the output norm and matrix; a model without its own matrix
    # uses (a copy of) the token embeddings.
    output = named.pop("output_norm.weight", 0) + named.pop("output_norm.bias", 0)
    output += named.pop("output.weight", 0) or named.get("token_embd.weight", 0)
    tokens = fields.get("tokenizer.ggml.tokens")
    return GgufFacts(
        path=str(path),
        architecture=arch,
        fill_in_middle=_has_fim(fields),
        block_count=blocks,
        embedding_length=embedding,
        head_count=heads,
        head_count_kv=per_block,
        key_length=number("attention.key_length", head_size),
        value_length=number("attention.value_length", head_size),
        context_length=number("context_length"),
        vocab_size=number("vocab_size", len(tokens.data) if tokens is not None else 0),
        layer_bytes=tuple(layers),
        output_bytes=output,
        input_bytes=sum(named.values()),
        file_bytes=path.stat().st_size,
    )


_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def _shards(path: Path, first: Any) -> list[Any]:
    """Every file of a model split by llama.cpp's gguf-split (`name-00001-of-00003.gguf`):
    the header is in the first, the tensors in all of them."""
    match = _SPLIT.match(path.name)
    if match is None or match.group("index") != "00001":
        return [first]
    from gguf import GGUFReader

    readers = [first]
    count = int(match.group("count"))
    for index in range(2, count + 1):
        shard = path.with_name(f"{match.group('stem')}-{index:05d}-of-{count:05d}.gguf")
        try:
            readers.append(GGUFReader(os.fspath(shard), "r"))
        except (ValueError, OSError) as exc:
            raise GgufError(f"{shard}: a part of {path.name} that cannot be read ({exc})") from None
    return readers


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
