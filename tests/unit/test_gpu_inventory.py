"""A host's GPUs: the operator's label, nvidia-smi's answer, and the `ray start` flags that
`proxifier node` prints for them (here with a stand-in nvidia-smi on PATH)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxifier.gpu_inventory import (
    GiB,
    Gpu,
    declared_gpu_memory,
    gpu_type,
    parse_nvidia_smi,
    process_usage,
    ray_start_flags,
)

H100_SMI = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"


def test_declared_gpu_memory_comes_from_the_label() -> None:
    assert declared_gpu_memory({"gpu-memory-gb": "24"}) == 24 * GiB
    assert declared_gpu_memory({"gpu-memory-gb": "79.6"}) == 79.6 * GiB
    assert declared_gpu_memory({"gpu-memory-gb": "lots"}) is None
    assert declared_gpu_memory({}) is None


def test_nvidia_smi_csv() -> None:
    gpus = parse_nvidia_smi(H100_SMI + "garbage line\n")
    assert gpus == [
        Gpu(0, "NVIDIA H100 80GB HBM3", 81559 * 1024**2),
        Gpu(1, "NVIDIA H100 80GB HBM3", 81559 * 1024**2),
    ]


def test_gpu_type_names() -> None:
    assert gpu_type("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_type("NVIDIA A100-SXM4-40GB") == "a100"
    assert gpu_type("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert gpu_type("Tesla T4") == "t4"


def test_ray_start_flags() -> None:
    flags = ray_start_flags(parse_nvidia_smi(H100_SMI))
    assert flags == [
        "--num-gpus=2",
        "--labels=gpu-memory-gb=79.6,gpu-type=h100",
        """--resources='{"gpu_type:h100": 2}'""",
    ]
    assert ray_start_flags([]) == ["--num-gpus=0"]
    mixed = [Gpu(0, "NVIDIA A10", 24 * GiB), Gpu(1, "NVIDIA L4", 22 * GiB)]
    assert ray_start_flags(mixed)[1] == "--labels=gpu-memory-gb=22,gpu-type=mixed"


def test_proxifier_node_prints_the_flags_for_this_hosts_gpus(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nprintf '{H100_SMI}'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "proxifier.cli", "node"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "# found: GPU 0: NVIDIA H100 80GB HBM3, 79.6 GiB, GPU 1: NVIDIA H100 80GB HBM3, 79.6 GiB"
    )
    assert lines[1] == (
        "ray start --address=HEAD:6379 --num-gpus=2 --labels=gpu-memory-gb=79.6,gpu-type=h100 "
        """--resources='{"gpu_type:h100": 2}'"""
    )


def test_a_process_gpu_memory_from_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from actors.gpu_probe import process_gpu_memory

    fake = tmp_path / "nvidia-smi"
    # Two GPUs hold memory of process 4242 (a model split over them); another process too.
    fake.write_text("#!/bin/sh\nprintf '4242, 6000\\n999, 100\\n4242, 1500\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert process_gpu_memory(4242) == 7500 * 1024**2
    assert process_gpu_memory(1) is None  # not on any GPU
    assert process_usage("[N/A]\n", 1) is None
