"""Each config mistake gives one exact message naming the file, the place, the field and the fix."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxifier.config import (
    ConfigError,
    load_auth_config,
    load_models_config,
    model_path_warnings,
    model_start_problem,
    parse_expiry,
    validate_auth,
    validate_models,
)


def model_errors(models: dict, settings: dict | None = None) -> list[str]:
    data: dict = {"models": models}
    if settings is not None:
        data["settings"] = settings
    with pytest.raises(ConfigError) as caught:
        validate_models(data, file="models.yaml")
    return [str(issue) for issue in caught.value.issues]


def auth_errors(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_auth(data, file="auth.yaml")
    return [str(issue) for issue in caught.value.issues]


KEY = {"key": "k-1", "permissions": ["read"]}


@pytest.mark.parametrize("priority", [0, 11, -3, "high"])
def test_priority_outside_1_to_10(priority: object) -> None:
    shown = repr(priority) if isinstance(priority, str) else str(priority)
    assert model_errors({"chat": {"priority": priority}}) == [
        f"models.yaml: model 'chat': field 'priority': {shown} is not allowed; "
        "expected an integer from 1 (lowest) to 10 (highest)"
    ]


@pytest.mark.parametrize("port", [80, 1023, 65536])
def test_port_outside_range(port: int) -> None:
    assert model_errors({"chat": {"port": port}}) == [
        f"models.yaml: model 'chat': field 'port': {port} is not allowed; "
        "expected an integer from 1024 to 65535"
    ]


def test_port_used_twice() -> None:
    assert model_errors({"a": {"port": 11001}, "b": {"port": 11001}}) == [
        "models.yaml: model 'b': field 'port': 11001 is already used by model 'a'; "
        "each model needs its own port (or leave port out to pick a free one)"
    ]


def test_port_of_the_proxy_itself() -> None:
    assert model_errors({"a": {"port": 9000}}, {"port": 9000}) == [
        "models.yaml: model 'a': field 'port': 9000 is the proxy's own port (settings.port); "
        "choose another or leave port out"
    ]


def test_unknown_key_suggests_the_right_one() -> None:
    assert model_errors({"chat": {"priorty": 3}}) == [
        "models.yaml: model 'chat': field 'priorty': unknown field; did you mean 'priority'?"
    ]


def test_unknown_key_far_from_any_lists_what_is_allowed() -> None:
    (message,) = model_errors({"chat": {"colour": "blue"}})
    assert message.startswith(
        "models.yaml: model 'chat': field 'colour': unknown field; allowed fields are model_path, "
        "hf_repo, hf_file, "
        "port, priority, resource_group,"
    )


def test_unknown_settings_and_top_level_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_models(
            {"setings": {}, "models": {}, "settings": {"idle_timout": 5}}, file="m.yaml"
        )
    assert [str(issue) for issue in caught.value.issues] == [
        "m.yaml: top level: field 'setings': unknown field; did you mean 'settings'?",
        "m.yaml: settings: field 'idle_timout': unknown field; did you mean 'idle_timeout'?",
    ]


def test_nested_queue_setting() -> None:
    assert model_errors({}, {"queue": {"max_queue_size": 0}}) == [
        "models.yaml: settings: field 'queue.max_queue_size': 0 is not allowed; "
        "expected an integer of 1 or more"
    ]


def test_every_error_is_listed_not_just_the_first() -> None:
    errors = model_errors(
        {
            "a": {"priority": 42, "port": 11001, "resource_grup": "x"},
            "b": {"port": 11001, "gpu_layers": "all"},
            "c": {"additional_args": "--port 9999"},
        }
    )
    assert errors == [
        "models.yaml: model 'a': field 'priority': 42 is not allowed; "
        "expected an integer from 1 (lowest) to 10 (highest)",
        "models.yaml: model 'a': field 'resource_grup': unknown field; "
        "did you mean 'resource_group'?",
        "models.yaml: model 'b': field 'gpu_layers': 'all' is not allowed; "
        "expected an integer: -1 for all layers, 0 for CPU only, or a layer count",
        "models.yaml: model 'b': field 'port': 11001 is already used by model 'a'; "
        "each model needs its own port (or leave port out to pick a free one)",
        "models.yaml: model 'c': field 'additional_args': '--port' is set by the proxifier and "
        "cannot be overridden; use the 'port' field",
    ]


def test_alias_clashing_with_a_model_name() -> None:
    assert model_errors({"a": {}, "b": {"aliases": ["a"]}}) == [
        "models.yaml: model 'b': field 'aliases': 'a' already names model 'a'; "
        "names and aliases must be unique"
    ]


def test_model_name_with_a_slash() -> None:
    assert model_errors({"team/chat": {}}) == [
        "models.yaml: model 'team/chat': invalid name; expected 1 to 128 characters without '/', "
        "control characters or leading/trailing spaces"
    ]


def test_sizes_accept_units() -> None:
    config = validate_models(
        {"settings": {"max_body_size": "2MiB"}, "models": {"a": {"memory": "16GB"}}}, file="m"
    )
    assert config.settings.max_body_size == 2 * 1024 * 1024
    assert config.models["a"].memory == 16 * 1000**3


def test_bad_size() -> None:
    assert model_errors({"a": {"memory": "lots"}}) == [
        "models.yaml: model 'a': field 'memory': 'lots' is not allowed; "
        "expected a size in bytes, or a string such as 16GiB"
    ]


# --- auth.yaml ---------------------------------------------------------------------------------


def test_permission_outside_the_four() -> None:
    assert auth_errors({"api_keys": {"ops": {"key": "x", "permissions": ["read", "write"]}}}) == [
        "auth.yaml: api key 'ops': field 'permissions': 'write' is not allowed; "
        "expected a list from admin, models, config, read"
    ]


def test_expires_that_is_not_a_date() -> None:
    assert auth_errors({"api_keys": {"ops": {**KEY, "expires": "next tuesday"}}}) == [
        "auth.yaml: api key 'ops': field 'expires': 'next tuesday' is not a date; expected an "
        "ISO 8601 date such as 2025-12-31 or 2025-12-31T23:59:59Z (no time zone means UTC)"
    ]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2024-12-31T23:59:59Z", datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("2024-12-31T23:59:59", datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("2024-12-31T23:59:59+02:00", datetime(2024, 12, 31, 21, 59, 59, tzinfo=UTC)),
        ("2024-12-31", datetime(2025, 1, 1, tzinfo=UTC)),
    ],
)
def test_expires_with_or_without_time_zone(written: str, expected: datetime) -> None:
    key = validate_auth({"api_keys": {"k": {**KEY, "expires": written}}}, file="a").api_keys["k"]
    assert key.expires == expected


def test_unquoted_yaml_dates_work_too(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(
        "api_keys:\n"
        "  a: {key: one, permissions: [read], expires: 2024-12-31}\n"
        "  b: {key: two, permissions: [read], expires: 2024-12-31T10:00:00}\n"
    )
    auth = load_auth_config(path)
    assert auth.api_keys["a"].expires == datetime(2025, 1, 1, tzinfo=UTC)
    assert auth.api_keys["b"].expires == datetime(2024, 12, 31, 10, tzinfo=UTC)
    assert parse_expiry(None) is None


def test_key_value_used_twice_never_prints_the_key() -> None:
    digest = hashlib.sha256(b"shared-secret").hexdigest()
    errors = auth_errors(
        {
            "api_keys": {
                "one": {"key": "shared-secret", "permissions": ["read"]},
                "two": {"key_sha256": digest.upper(), "permissions": ["models"]},
            }
        }
    )
    assert errors == [
        "auth.yaml: api key 'two': field 'key': the same key value as api key 'one'; "
        "each key needs its own value"
    ]
    assert "shared-secret" not in "\n".join(errors)


def test_bad_digest_is_not_echoed() -> None:
    assert auth_errors(
        {"api_keys": {"a": {"key_sha256": "secret-ish", "permissions": ["read"]}}}
    ) == [
        "auth.yaml: api key 'a': field 'key_sha256': the value given is not allowed; "
        "expected 64 hexadecimal characters (the SHA-256 digest of the key)"
    ]


def test_key_or_digest_exactly_one() -> None:
    assert auth_errors({"api_keys": {"a": {"permissions": ["read"]}}}) == [
        "auth.yaml: api key 'a': field 'key': set exactly one of key (plain text) and "
        "key_sha256 (preferred: the SHA-256 hex digest of the key)"
    ]


def test_admin_route_cannot_be_public() -> None:
    assert auth_errors({"public_endpoints": ["/health", "/admin/models/status", "metrics"]}) == [
        "auth.yaml: field 'public_endpoints': '/admin/models/status' cannot be public; "
        "admin and dashboard routes always need a key",
        "auth.yaml: field 'public_endpoints': 'metrics' is not allowed; "
        "expected an exact path starting with /",
    ]


def test_rate_limit_must_be_positive() -> None:
    assert auth_errors({"rate_limits": {"default": 0}}) == [
        "auth.yaml: field 'rate_limits': {'default': 0} is not allowed; "
        "expected a mapping of key class: requests per minute (an integer of 1 or more)"
    ]


# --- files --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_models_config(tmp_path / "nope.yaml")
    assert str(caught.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: {priority: 3\n")
    with pytest.raises(ConfigError) as caught:
        load_models_config(path)
    assert str(caught.value).startswith(f"{path}: line 3 column 1: invalid YAML:")


def test_missing_model_file_warns_at_load_and_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  a: {model_path: weights/a.gguf}\n  b: {}\n")
    config = load_models_config(path)
    assert [str(w) for w in model_path_warnings(config, "models.yaml")] == [
        f"models.yaml: model 'a': field 'model_path': '{tmp_path / 'weights/a.gguf'}' does not "
        "exist on this machine; the model cannot start here until it does",
        "models.yaml: model 'b': field 'model_path': not set; the model cannot start until it is",
    ]
    assert model_start_problem(config, "a") == (
        f"model 'a': model_path '{tmp_path / 'weights/a.gguf'}' does not exist"
    )
    assert model_start_problem(config, "b") == (
        "model 'b' has no model_path or hf_repo; set one in models.yaml"
    )
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "a.gguf").write_bytes(b"GGUF")
    assert model_start_problem(config, "a") is None
    assert model_path_warnings(config, "models.yaml")[0].where == "model 'b'"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "models.yaml"
    path.write_text("settings: {auth_file: auth.yaml}\nmodels:\n  a: {model_path: ../m/a.gguf}\n")
    config = load_models_config(path)
    assert config.model_file("a") == tmp_path / "m" / "a.gguf"
    assert config.auth_path() == tmp_path / "conf" / "auth.yaml"


def test_names_and_aliases_resolve() -> None:
    config = validate_models({"models": {"a": {"aliases": ["gpt-4o", "chat"]}}}, file="m")
    assert config.resolve_name("a") == "a"
    assert config.resolve_name("chat") == "a"
    assert config.resolve_name("b") is None


def test_env_names_must_be_variable_names() -> None:
    assert model_errors({"a": {"env": {"BAD=NAME": "1"}}}) == [
        "models.yaml: model 'a': field 'env': {'BAD=NAME': '1'} is not allowed; "
        "expected a mapping of NAME: value (names of letters, digits and _)"
    ]


def test_auth_yaml_shown_with_keys_redacted_in_any_style() -> None:
    from actors.controller.config_files import redact_keys

    text = (
        "# keys below\n"
        "api_keys:\n"
        "  a: {key: flow-secret, permissions: [read]}\n"
        "  b:\n"
        '    key: "block-secret"\n'
        "    permissions: [models]\n"
        f"  c: {{key_sha256: {'ab' * 32}, permissions: [read]}}\n"
    )
    shown = redact_keys(text)
    assert "flow-secret" not in shown and "block-secret" not in shown and "ab" * 32 not in shown
    assert shown.count("<redacted>") == 3 and shown.startswith("# keys below")


def test_models_yaml_shown_with_secret_env_values_redacted() -> None:
    from actors.controller.config_files import redact_env_secrets

    text = (
        "models:\n"
        "  private:\n"
        "    hf_repo: me/private-GGUF\n"
        "    env: {HF_TOKEN: hf_abcdefgh, CUDA_VISIBLE_DEVICES: '0'}\n"
        "  other:\n"
        "    env:\n"
        "      OPENAI_API_KEY: sk-live-123\n"
        "      db_password: hunter22\n"
        "      LLAMA_ARG_THREADS: 8\n"
    )
    shown = redact_env_secrets(text)
    for secret in ("hf_abcdefgh", "sk-live-123", "hunter22"):
        assert secret not in shown
    assert shown.count("<redacted>") == 3
    assert "CUDA_VISIBLE_DEVICES: '0'" in shown and "LLAMA_ARG_THREADS: 8" in shown
    assert redact_env_secrets("models: [unclosed") == "models: [unclosed"


def test_reranking_and_embeddings_on_one_model() -> None:
    errors = model_errors({"m": {"embeddings": True, "reranking": True}})
    assert len(errors) == 1
    assert "model 'm': field 'reranking': cannot be set with 'embeddings: true'" in errors[0]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--embeddings", "--pooling", "mean"], "embeddings"),
        ("--embedding --pooling mean", "embeddings"),  # the string form, the short spelling
        (["--reranking"], "reranking"),
        ("--rerank", "reranking"),
    ],
)
def test_a_switch_in_additional_args_counts_as_its_field(args: object, field: str) -> None:
    config = validate_models({"models": {"m": {"additional_args": args}}}, file="models.yaml")
    model = config.models["m"]
    assert getattr(model, field) is True
    assert (model.embeddings, model.reranking).count(True) == 1


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"additional_args": "--embeddings --rerank"}, "additional_args", "'--rerank' in"),
        ({"additional_args": ["--embeddings"], "reranking": True}, "reranking", "cannot"),
        ({"additional_args": ["--reranking"], "embeddings": True}, "additional_args", "'--rer"),
    ],
)
def test_embeddings_and_reranking_clash_however_they_are_asked_for(
    fields: dict, where: str, says: str
) -> None:
    errors = model_errors({"m": fields})
    assert len(errors) == 1
    assert errors[0].startswith(f"models.yaml: model 'm': field '{where}': {says}")
    assert "reranking pools each input into one score" in errors[0]


def test_reranking_flag_with_the_reranking_field() -> None:
    errors = model_errors({"m": {"reranking": True, "additional_args": ["--rerank"]}})
    assert errors == [
        "models.yaml: model 'm': field 'additional_args': '--rerank' repeats the 'reranking' "
        "field; set one of them, not both"
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"hf_repo": "owner/tiny-GGUF", "hf_file": "../../../../etc/passwd"}, "hf_file"),
        ({"hf_repo": "owner/tiny-GGUF", "hf_file": "/etc/passwd.gguf"}, "hf_file"),
        ({"hf_repo": "owner/tiny-GGUF", "hf_file": "a/../../b.gguf"}, "hf_file"),
        ({"hf_repo": "owner/tiny-GGUF", "hf_file": "model.gguf\n"}, "hf_file"),
        ({"hf_repo": "https://huggingface.co/owner/tiny-GGUF"}, "hf_repo"),
        ({"hf_repo": "owner/../../x"}, "hf_repo"),
        ({"hf_repo": "owner/x\nevil"}, "hf_repo"),
        ({"hf_repo": "owner--x/tiny"}, "hf_repo"),  # the Hub's own rule (validate_repo_id)
        ({"hf_repo": "owner/.hidden"}, "hf_repo"),
    ],
)
def test_a_repository_or_file_that_could_leave_the_hub_is_refused_when_read(
    fields: dict, field: str
) -> None:
    (error,) = model_errors({"m": fields})
    assert error.startswith(f"models.yaml: model 'm': field '{field}': {fields[field]!r}")


def test_hub_names_as_users_write_them_pass() -> None:
    models = {
        "a": {"hf_repo": "bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M"},
        "b": {"hf_repo": "proxifier-tests/tiny-GGUF", "hf_file": "tiny-Q8_0.gguf"},
        "c": {"hf_repo": "o/r", "hf_file": "Q8_0/model-Q8_0-00001-of-00002.gguf"},
    }
    assert set(validate_models({"models": models}, file="models.yaml").models) == {"a", "b", "c"}


def test_one_models_failing_cache_lookup_leaves_the_others_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxifier.config import schema

    (tmp_path / "local.gguf").write_bytes(b"GGUF")
    models = {"hub": {"hf_repo": "o/r", "hf_file": "m.gguf"}, "local": {"model_path": "local.gguf"}}
    config = validate_models({"models": models}, file="models.yaml", base_dir=tmp_path)

    def failing(*_: object) -> None:  # what huggingface_hub raised for a bad name
        raise ValueError("Invalid repo_id or filename")

    monkeypatch.setattr(schema, "cached_file", failing)
    assert config.model_file("hub") is None
    assert config.model_file("local") == tmp_path / "local.gguf"
