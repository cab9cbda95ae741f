"""The llama-server command line: one test per config field it maps, and the flags it owns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxifier.config import ConfigError, ModelConfig, validate_models
from proxifier.llama import (
    LlamaServerNotFound,
    build_argv,
    find_llama_server,
    installed_llama_server,
    public_props,
)

BASE = ["llama-server", "-m", "/m/a.gguf", "--host", "10.0.0.5", "--port", "12345"]


def argv(**fields: object) -> list[str]:
    model = ModelConfig.model_validate(fields)
    return build_argv(
        model,
        binary="llama-server",
        model_file="/m/a.gguf",
        host="10.0.0.5",
        port=12345,
        api_key_file="/run/key",
    )


def test_minimal_model() -> None:
    assert argv() == [*BASE, "-np", "4", "--api-key-file", "/run/key"]


def test_the_model_name_becomes_llama_servers_alias() -> None:
    model = ModelConfig()
    result = build_argv(
        model,
        binary="llama-server",
        model_file="/m/a.gguf",
        host="h",
        port=1,
        api_key_file="/k",
        alias="chat",
    )
    assert result[result.index("--alias") + 1] == "chat"


@pytest.mark.parametrize(
    ("field", "value", "flags"),
    [
        ("context_length", 8192, ["-c", "8192"]),
        ("gpu_layers", -1, ["-ngl", "-1"]),
        ("gpu_layers", 0, ["-ngl", "0"]),
        ("threads", 6, ["-t", "6"]),
        ("chat_template", "chatml", ["--chat-template", "chatml"]),
    ],
)
def test_field_maps_to_flag(field: str, value: object, flags: list[str]) -> None:
    result = argv(**{field: value})
    index = result.index(flags[0])
    assert result[index : index + len(flags)] == flags
    assert result.count(flags[0]) == 1


def test_parallel_sets_slots() -> None:
    result = argv(parallel=8)
    assert result[result.index("-np") + 1] == "8"


def test_embeddings_flag_only_when_asked() -> None:
    assert "--embeddings" in argv(embeddings=True)
    assert "--embeddings" not in argv()


def test_a_switch_in_additional_args_is_passed_once() -> None:
    line = argv(additional_args="--embeddings --pooling mean")
    assert line.count("--embeddings") == 1 and line[-3:] == ["--embeddings", "--pooling", "mean"]
    assert argv(additional_args=["--rerank"]).count("--reranking") == 0


def test_reranking_flag_only_when_asked() -> None:
    assert "--reranking" in argv(reranking=True)
    assert "--reranking" not in argv()


def test_additional_args_list_come_last() -> None:
    assert argv(additional_args=["--jinja", "--flash-attn", "on"])[-3:] == [
        "--jinja",
        "--flash-attn",
        "on",
    ]


def test_additional_args_string_is_split_like_a_shell() -> None:
    result = argv(additional_args="--alias 'my model' --temp 0.7")
    assert result[-4:] == ["--alias", "my model", "--temp", "0.7"]


def test_the_instance_key_never_appears_on_the_command_line() -> None:
    # `ps` shows every process's command line to every user of the host.
    assert "--api-key" not in argv() and argv()[argv().index("--api-key-file") + 1] == "/run/key"


OWNED = "is set by the proxifier and cannot be overridden"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--port 9999", f"'--port' {OWNED}; use the 'port' field"),
        ("--host=0.0.0.0", f"'--host' {OWNED}; it is the host the model actor chooses"),
        (
            "--api-key mine",
            f"'--api-key' {OWNED}; it is the per-instance key the model actor generates",
        ),
        ("-m other.gguf", f"'-m' {OWNED}; use the 'model_path' field"),
        ("--model other.gguf", f"'--model' {OWNED}; use the 'model_path' field"),
        ("-np 2", f"'-np' {OWNED}; use the 'parallel' field"),
        ("--alias x", f"'--alias' {OWNED}; it is the model's name in models.yaml"),
    ],
)
def test_owned_flags_are_a_config_error(args: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_models({"models": {"a": {"additional_args": args}}}, file="m.yaml")
    assert str(caught.value) == f"m.yaml: model 'a': field 'additional_args': {message}"


def test_flag_repeating_a_set_field_is_an_error_but_alone_is_fine() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_models(
            {"models": {"a": {"context_length": 4096, "additional_args": ["-c", "8192"]}}}, file="m"
        )
    assert str(caught.value) == (
        "m: model 'a': field 'additional_args': '-c' repeats the 'context_length' field; "
        "set one of them, not both"
    )
    alone = validate_models({"models": {"a": {"additional_args": ["-c", "8192"]}}}, file="m")
    assert alone.models["a"].additional_args == ["-c", "8192"]


# --- finding the binary: config, then the installed one, then PATH -------------------------------


def make_binary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROXIFIER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    return tmp_path


def test_configured_path_wins(isolated: Path) -> None:
    own = make_binary(isolated / "own" / "llama-server")
    make_binary(installed_llama_server())
    make_binary(isolated / "path" / "llama-server")
    assert find_llama_server(str(own)) == str(own)


def test_configured_command_name_is_looked_up_on_path(isolated: Path) -> None:
    on_path = make_binary(isolated / "path" / "llama-server-cuda")
    assert find_llama_server("llama-server-cuda") == str(on_path)


def test_installed_before_path(isolated: Path) -> None:
    installed = make_binary(installed_llama_server())
    make_binary(isolated / "path" / "llama-server")
    assert installed == isolated / "home" / "bin" / "llama-server"
    assert find_llama_server() == str(installed)


def test_path_last(isolated: Path) -> None:
    on_path = make_binary(isolated / "path" / "llama-server")
    assert find_llama_server() == str(on_path)


def test_nothing_found_says_how_to_fix(isolated: Path) -> None:
    with pytest.raises(LlamaServerNotFound) as caught:
        find_llama_server()
    assert "scripts/install-llama-server" in str(caught.value)
    with pytest.raises(LlamaServerNotFound, match="is not an executable file"):
        find_llama_server(str(isolated / "missing" / "llama-server"))
    assert not os.path.exists(isolated / "missing")


def test_props_shown_to_clients_name_the_model_file_not_where_it_lies() -> None:
    props = {"model_path": "/home/alice/models/qwen-7b-q4.gguf", "total_slots": 2}
    assert public_props(props) == {"model_path": "qwen-7b-q4.gguf", "total_slots": 2}
    assert public_props({"total_slots": 1}) == {"total_slots": 1}
