"""scripts/make-tiny-model: a deterministic, sub-megabyte llama GGUF that is never committed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf


def make(repo: Path, output: Path) -> bytes:
    subprocess.run(
        [sys.executable, str(repo / "scripts" / "make-tiny-model"), "--output", str(output)],
        check=True,
        capture_output=True,
    )
    return output.read_bytes()


def test_deterministic_and_small(repo: Path, tmp_path: Path) -> None:
    first = make(repo, tmp_path / "a.gguf")
    second = make(repo, tmp_path / "b.gguf")
    assert first == second
    assert len(first) < 1_000_000


def test_is_a_llama_model(tiny_model: Path) -> None:
    reader = gguf.GGUFReader(tiny_model)
    fields = reader.fields

    def scalar(name: str) -> object:
        field = fields[name]
        value = field.parts[field.data[0]]
        return bytes(value).decode() if field.types[0] == gguf.GGUFValueType.STRING else value[0]

    assert scalar("general.architecture") == "llama"
    assert scalar("tokenizer.ggml.model") == "llama"
    assert scalar("llama.embedding_length") == 64
    assert scalar("llama.block_count") == 2
    assert scalar("llama.attention.head_count") == 4
    assert "tokenizer.chat_template" in fields
    assert {t.name for t in reader.tensors} >= {
        "token_embd.weight",
        "output.weight",
        "blk.1.ffn_down.weight",
    }


def test_model_files_are_ignored_by_git(repo: Path) -> None:
    result = subprocess.run(
        ["git", "check-ignore", "-q", "models/tiny.gguf"], cwd=repo, check=False
    )
    assert result.returncode == 0
