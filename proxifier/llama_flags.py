"""The llama-server flags the product owns or maps to config fields, and the clash check for
`additional_args`. Pure: no I/O; below `proxifier.config` and `proxifier.llama`, imports neither."""

from __future__ import annotations

from collections.abc import Iterable

# Flags the product sets itself: a second copy in additional_args would silently win or clash.
OWNED_FLAGS: dict[str, str] = {
    "-m": "model_path",
    "--model": "model_path",
    "--host": "the host the model actor chooses",
    "--port": "port",
    "--api-key": "the per-instance key the model actor generates",
    "--api-key-file": "the per-instance key the model actor generates",
    "-np": "parallel",
    "--parallel": "parallel",
    "-a": "the model's name in models.yaml",
    "--alias": "the model's name in models.yaml",
}

# Flags that duplicate a config field: an error only when the field is set too.
FIELD_FLAGS: dict[str, str] = {
    "-c": "context_length",
    "--ctx-size": "context_length",
    "-ngl": "gpu_layers",
    "--gpu-layers": "gpu_layers",
    "--n-gpu-layers": "gpu_layers",
    "-t": "threads",
    "--threads": "threads",
    "--chat-template": "chat_template",
    "--embedding": "embeddings",
    "--embeddings": "embeddings",
    "--rerank": "reranking",
    "--reranking": "reranking",
}


# Switches that turn a model's field on by themselves (no value): the seed's way to ask for
# embeddings or reranking, which counts as the field (`fields_switched_on`).
SWITCH_FLAGS = frozenset({"--embedding", "--embeddings", "--rerank", "--reranking"})


def flag_names(args: Iterable[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]


def fields_switched_on(args: Iterable[str]) -> dict[str, str]:
    """The boolean fields these additional_args turn on, each with the flag that does it:
    `--embeddings` is `embeddings: true`, `--reranking` is `reranking: true`."""
    found: dict[str, str] = {}
    for flag in flag_names(args):
        if flag in SWITCH_FLAGS:
            found.setdefault(FIELD_FLAGS[flag], flag)
    return found


def additional_args_conflicts(args: list[str], set_fields: set[str]) -> list[str]:
    """Why these additional_args clash with what the product or the model's fields set."""
    problems: list[str] = []
    for flag in flag_names(args):
        if flag in OWNED_FLAGS:
            owner = OWNED_FLAGS[flag]
            how = (
                f"use the '{owner}' field"
                if owner in {"model_path", "port", "parallel"}
                else (f"it is {owner}")
            )
            problems.append(f"{flag!r} is set by the proxifier and cannot be overridden; {how}")
        elif flag in FIELD_FLAGS and FIELD_FLAGS[flag] in set_fields:
            field = FIELD_FLAGS[flag]
            problems.append(f"{flag!r} repeats the '{field}' field; set one of them, not both")
    return problems


VERBOSITY_FLAGS = frozenset({"-lv", "--verbosity", "--log-verbosity", "-v", "--verbose"})
