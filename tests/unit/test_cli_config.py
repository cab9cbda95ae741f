"""`proxifier config validate` and `proxifier config diff`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxifier.cli import main


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_validate_shipped_configs(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "config",
            "validate",
            "--models",
            str(repo / "configs" / "models.yaml"),
            "--auth",
            str(repo / "configs" / "auth.yaml"),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(out) == 19  # one line per model, then the summary
    assert out[0].split()[0] in {"always-ready", "critical-model", "prod-chat"}  # priority 10 first
    assert out[-1].startswith("OK: 18 model(s)")
    assert out[-1].endswith("auth: on, 3 key(s) (" + str(repo / "configs" / "auth.yaml") + ")")


def test_validate_lists_every_error_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = write(
        tmp_path / "models.yaml",
        "models:\n  a: {priorty: 3}\n  b: {priority: 11, port: 11001}\n  c: {port: 11001}\n",
    )
    auth = write(tmp_path / "auth.yaml", "api_keys:\n  k: {key: x, permissions: [write]}\n")
    code = main(["config", "validate", "--models", str(models), "--auth", str(auth)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"error: {models}: model 'a': field 'priorty': unknown field; did you mean 'priority'?",
        f"error: {models}: model 'b': field 'priority': 11 is not allowed; "
        "expected an integer from 1 (lowest) to 10 (highest)",
        f"error: {models}: model 'c': field 'port': 11001 is already used by model 'b'; "
        "each model needs its own port (or leave port out to pick a free one)",
        f"error: {auth}: api key 'k': field 'permissions': 'write' is not allowed; "
        "expected a list from admin, models, config, read",
        "4 error(s); the configuration was not accepted",
    ]


def test_validate_says_which_flags_it_read_as_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = write(
        tmp_path / "models.yaml",
        "models:\n  e: {model_path: e.gguf, additional_args: '--embedding --pooling mean'}\n"
        "  r: {model_path: r.gguf, additional_args: ['--reranking']}\n",
    )
    assert main(["config", "validate", "--models", str(models)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "e" and "embeddings" in out[0].split()
    assert out[1] == "  e: embeddings: on, from '--embedding' in additional_args"
    assert out[2].split()[0] == "r" and "reranking" in out[2].split()
    assert out[3] == "  r: reranking: on, from '--reranking' in additional_args"


def test_validate_uses_settings_auth_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "auth.yaml", "enabled: false\n")
    models = write(tmp_path / "models.yaml", "settings: {auth_file: auth.yaml}\nmodels: {a: {}}\n")
    assert main(["config", "validate", "--models", str(models)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == (
        f"OK: 1 model(s), 1 warning(s); auth: off ({tmp_path / 'auth.yaml'} says enabled: false)"
    )
    assert "field 'model_path': not set" in captured.err


def test_validate_auth_alone_needs_no_models_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/models.yaml here
    auth = write(tmp_path / "auth.yaml", "api_keys: {ops: {key: k-ops, permissions: [admin]}}\n")
    assert main(["config", "validate", "--auth", str(auth)]) == 0
    assert capsys.readouterr().out == f"OK: auth: on, 1 key(s) ({auth})\n"
    bad = write(tmp_path / "bad.yaml", "api_keys: {ops: {key: k, permissions: [root]}}\n")
    assert main(["config", "validate", "--auth", str(bad)]) == 1
    assert "permissions" in capsys.readouterr().err


def test_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write(tmp_path / "old.yaml", "models:\n  a: {priority: 3}\n  b: {context_length: 100}\n")
    new = write(
        tmp_path / "new.yaml", "models:\n  a: {priority: 4}\n  b: {context_length: 200}\n  c: {}\n"
    )
    assert main(["config", "diff", str(old), str(new)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "added model 'c'",
        "model 'b' needs a restart: context_length changed",
        "model 'a' changes live: priority",
    ]


def test_console_script_is_installed(repo: Path) -> None:
    script = Path(sys.executable).parent / "proxifier"
    result = subprocess.run(
        [str(script), "config", "validate", "--models", str(repo / "configs" / "demo.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("OK: 2 model(s)")


def test_serve_refuses_a_public_address_with_auth_off(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--config", str(repo / "configs" / "demo.yaml"), "--host", "0.0.0.0"])
    assert code == 2
    assert "error: refusing to listen on 0.0.0.0 with auth off" in capsys.readouterr().err


def test_keys_new_prints_a_key_and_lines_that_load(capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    import yaml

    from proxifier.config import validate_auth

    code = main(["keys", "new", "ops-key", "--permissions", "models", "read", "--models", "q-*"])
    out = capsys.readouterr().out
    assert code == 0
    key = out.splitlines()[0].removeprefix("key: ")
    assert key.startswith("px-") and len(key) > 40
    lines = out.split("Add under api_keys: in auth.yaml:\n", 1)[1]
    entries = yaml.safe_load(lines)
    assert key not in lines  # only the digest is written
    auth = validate_auth({"api_keys": entries}, file="pasted")
    assert auth.api_keys["ops-key"].digest() == hashlib.sha256(key.encode()).hexdigest()
    assert auth.api_keys["ops-key"].models == ["q-*"]


def test_serve_with_a_bad_config_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = write(tmp_path / "models.yaml", "models:\n  a: {priority: 0}\n  b: {prot: 1}\n")
    assert main(["serve", "--config", str(models)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {models}: model 'a': field 'priority': 0 is not allowed; "
        "expected an integer from 1 (lowest) to 10 (highest)",
        f"error: {models}: model 'b': field 'prot': unknown field; did you mean 'port'?",
        "the configuration was not accepted; nothing was started",
    ]
