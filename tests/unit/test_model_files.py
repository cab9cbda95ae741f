"""Which file a Hugging Face model means, where a node keeps it, how its download reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxifier.config import ConfigError, validate_models
from proxifier.lifecycle import start_phases
from proxifier.model_files import (
    HfSource,
    cached_file,
    choose_gguf,
    describe_progress,
    fetch,
    hf_source,
    hub_message,
    hub_options,
    model_cache,
    split_parts,
)
from tests.fakes.hub import Repo, running_hub

FILES = [
    "README.md",
    "model-Q4_K.gguf",
    "model-Q4_K_M.gguf",
    "model-Q8_0.gguf",
    "mmproj-model-f16.gguf",
    "big-Q6_K-00001-of-00002.gguf",
    "big-Q6_K-00002-of-00002.gguf",
]


def test_a_tag_names_exactly_its_file() -> None:
    assert choose_gguf(FILES, "Q4_K_M", "o/r") == "model-Q4_K_M.gguf"
    assert choose_gguf(FILES, "q8_0", "o/r") == "model-Q8_0.gguf"
    assert choose_gguf(FILES, "Q4_K", "o/r") == "model-Q4_K.gguf"  # not Q4_K_M's
    assert choose_gguf(FILES, "Q6_K", "o/r") == "big-Q6_K-00001-of-00002.gguf"  # first part


def test_no_tag_means_the_only_gguf_or_q4_k_m() -> None:
    assert choose_gguf(["a.gguf", "mmproj-a.gguf"], None, "o/r") == "a.gguf"
    assert choose_gguf(FILES, None, "o/r") == "model-Q4_K_M.gguf"


def test_a_choice_that_cannot_be_made_says_what_there_is() -> None:
    with pytest.raises(FileNotFoundError, match=r"has no file for the tag 'IQ2_XS'.*model-Q8_0"):
        choose_gguf(FILES, "IQ2_XS", "o/r")
    with pytest.raises(FileNotFoundError, match="several files and no tag"):
        choose_gguf(["a-Q8_0.gguf", "a-F16.gguf"], None, "o/r")
    with pytest.raises(FileNotFoundError, match=r"has no \.gguf file"):
        choose_gguf(["README.md"], None, "o/r")


def test_source_and_config_rules() -> None:
    assert hf_source("o/r:Q8_0", None) == HfSource("o/r", None, "Q8_0")
    assert hf_source("o/r", "f.gguf").label == "o/r/f.gguf"
    assert hf_source(None, None) is None
    with pytest.raises(ConfigError) as caught:
        validate_models(
            {
                "models": {
                    "both": {"model_path": "a.gguf", "hf_repo": "o/r"},
                    "orphan": {"hf_file": "f.gguf"},
                    "twice": {"hf_repo": "o/r:Q8_0", "hf_file": "f.gguf"},
                    "bad": {"hf_repo": "not a repo"},
                }
            },
            file="m.yaml",
        )
    text = str(caught.value)
    assert "model 'both': field 'hf_repo': set either model_path or hf_repo, not both" in text
    assert "model 'orphan': field 'hf_file': needs hf_repo" in text
    assert "model 'twice': field 'hf_file': hf_repo 'o/r:Q8_0' names a tag already" in text
    assert "model 'bad': field 'hf_repo': 'not a repo' is not allowed" in text


def test_the_cache_is_expanded_on_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_DISK", "/mnt/fast")
    monkeypatch.setenv("PROXIFIER_HOME", "/opt/proxifier")
    assert model_cache("$NODE_DISK/models") == Path("/mnt/fast/models")
    assert model_cache(None) == Path("/opt/proxifier/models")
    assert hub_options({"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://mirror/"}) == {
        "token": "hf_x",
        "endpoint": "http://mirror",
    }


def test_progress_reads_in_the_unit_of_the_total() -> None:
    assert describe_progress(1288490188, 5046586573) == "downloading 1.2/4.7 GiB"
    assert describe_progress(5 * 1024**2, 300 * 1024**2) == "downloading 5.0/300.0 MiB"
    assert describe_progress(0, None) == "downloading 0.0 KiB"


def test_a_download_reports_progress_and_a_second_one_is_not_needed(
    tmp_path: Path, tiny_model: Path
) -> None:
    data = tiny_model.read_bytes()
    with running_hub() as hub:
        hub.repos["o/r"] = Repo({"m-Q8_0.gguf": data})
        seen: list[tuple[int, int | None]] = []
        env = {"HF_ENDPOINT": hub.url}
        path = fetch(hf_source("o/r:Q8_0", None), tmp_path, env, lambda d, t: seen.append((d, t)))
        assert path.read_bytes() == data
        assert seen[0] == (0, len(data)) and seen[-1] == (len(data), len(data))
        assert cached_file(hf_source("o/r", "m-Q8_0.gguf"), tmp_path) == path
        assert cached_file(hf_source("o/r", "other.gguf"), tmp_path) is None
        # A tag finds its file among this node's copies, with no call to the Hub.
        assert cached_file(hf_source("o/r:Q8_0", None), tmp_path) == path
        assert cached_file(hf_source("o/r:Q4_K_M", None), tmp_path) is None
        assert cached_file(hf_source("o/other:Q8_0", None), tmp_path) is None
        assert cached_file(hf_source("o/r:Q8_0", None), tmp_path / "nothing-here") is None
        with pytest.raises(Exception) as missing:
            fetch(hf_source("o/none", "m.gguf"), tmp_path, env, lambda d, t: None)
        message = hub_message(missing.value)
        assert message.startswith("404 Client Error: Repository Not Found for url: ")
        assert message.endswith("(the Hub says: Repository not found)")
        assert hub.downloads == [("o/r", "m-Q8_0.gguf")]


def test_a_download_is_its_own_phase_of_a_start() -> None:
    timeline = {"wanted": 0.0, "placed": 0.1, "actor": 0.2, "download": 0.3, "downloaded": 5.3}
    assert start_phases(timeline, spawned=5.5, ready=6.0) == {
        "decide": 0.1,
        "actor": 0.1,
        "prepare": 0.3,
        "download": 5.0,
        "load": 0.5,
    }


def test_a_private_repository_reads_the_token_from_the_models_env(
    tmp_path: Path, tiny_model: Path
) -> None:
    with running_hub() as hub:
        hub.repos["o/private"] = Repo({"m.gguf": tiny_model.read_bytes()}, token="hf_secret")
        source, env = hf_source("o/private", "m.gguf"), {"HF_ENDPOINT": hub.url}
        with pytest.raises(Exception) as refused:
            fetch(source, tmp_path, env, lambda d, t: None)
        assert hub_message(refused.value).startswith("401 Client Error")
        path = fetch(source, tmp_path, {**env, "HF_TOKEN": "hf_secret"}, lambda d, t: None)
        assert path.read_bytes() == tiny_model.read_bytes()


def test_a_split_model_comes_with_all_its_parts(tmp_path: Path) -> None:
    first, second = b"GGUF" + bytes(3000), bytes(5000)
    names = ["big-Q6_K-00001-of-00002.gguf", "big-Q6_K-00002-of-00002.gguf"]
    assert split_parts(names[0]) == names and split_parts("x-Q8_0.gguf") == ["x-Q8_0.gguf"]
    with running_hub() as hub:
        hub.repos["o/big"] = Repo({names[0]: first, names[1]: second, "README.md": b"x"})
        seen: list[tuple[int, int | None]] = []
        env = {"HF_ENDPOINT": hub.url}
        path = fetch(hf_source("o/big:Q6_K", None), tmp_path, env, lambda d, t: seen.append((d, t)))
        assert path.name == names[0] and (path.parent / names[1]).read_bytes() == second
        assert hub.downloads == [("o/big", names[0]), ("o/big", names[1])]
        assert {t for _, t in seen} == {8004} and seen[-1] == (8004, 8004)  # both parts' size
        assert cached_file(hf_source("o/big", names[0]), tmp_path) == path
        assert cached_file(hf_source("o/big:Q6_K", None), tmp_path) == path
        (path.parent / names[1]).unlink()  # a part missing: not a usable copy
        assert cached_file(hf_source("o/big", names[0]), tmp_path) is None
        assert cached_file(hf_source("o/big:Q6_K", None), tmp_path) is None
