"""`proxifier status` as a new user meets it (issue 29, item 6): the GPU column on a cluster with
and without GPUs, and output piped to a reader that stops early."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proxifier.cli_admin import _status_rows

MODEL = {
    "name": "chat",
    "state": "stopped",
    "priority": 5,
    "resource_group": "default",
    "gpu_memory": {"need": 0.3 * 1024**3},
}


def test_the_gpu_column_names_a_need_only_where_there_are_gpus() -> None:
    on_gpus = _status_rows([MODEL], cluster_gpus=True)[1]
    assert on_gpus[6] == "- need 0.3G"  # none held; what it would need on one
    assert _status_rows([MODEL], cluster_gpus=False)[1][6] == "-"
    on_cpu = {**MODEL, "gpu_memory": {**MODEL["gpu_memory"], "wants_gpu": False}}
    assert _status_rows([on_cpu], cluster_gpus=True)[1][6] == "-"  # num_gpus: 0


def test_output_to_a_reader_that_went_away_ends_without_a_traceback(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n" + "".join(f"  m{i}: {{model_path: m{i}.gguf}}\n" for i in range(50))
    )
    read, write = os.pipe()
    os.close(read)  # the reader (`| head -1`) has gone before the first write
    command = [sys.executable, "-m", "proxifier.cli", "config", "validate", "--models", str(models)]
    done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 1


def test_replicas_show_ready_of_wanted() -> None:
    replicated = {
        **MODEL,
        "state": "ready",
        "replicas": [{"name": "chat", "state": "ready"}, {"name": "chat#2", "state": "starting"}],
        "desired": {"replicas": 4, "reason": "scaled out"},
    }
    assert _status_rows([replicated])[1][2] == "1/4"
    assert _status_rows([MODEL])[1][2] == "-"
