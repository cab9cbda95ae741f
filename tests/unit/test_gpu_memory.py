"""The GPU memory estimate from a GGUF header and a model's flags, checked against GGUF files the
tests write (small tensors, headers with the shapes of real models), and the measured figures
parsed from llama-server's load log."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from proxifier.config import ModelConfig
from proxifier.gguf_facts import GgufError, GgufFacts, read_facts
from proxifier.gpu_memory import (
    PROCESS_OVERHEAD,
    EstimateError,
    MiB,
    calibration_key,
    estimate,
    flag_value,
    offloaded_layers,
    parse_load_log,
)
from proxifier.scheduler import gpu_fraction

# Llama-3.1-8B's header: 32 blocks, n_embd 4096, 32 heads, 8 KV heads of 128, vocab 128256.
LLAMA_8B = {"blocks": 32, "embd": 4096, "heads": 32, "kv_heads": 8, "vocab": 128256}


def write_model(
    path: Path,
    *,
    blocks: int = 4,
    embd: int = 64,
    heads: int = 4,
    kv_heads: int = 4,
    vocab: int = 32,
    context: int = 131072,
    quantized: bool = False,
    tied: bool = False,
) -> Path:
    """A llama GGUF whose header has these shapes; each block holds one tensor of
    1000 * (block + 1) bytes, so which blocks a sum took shows in the sum."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_embedding_length(embd)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(context)
    writer.add_vocab_size(vocab)
    for block in range(blocks):
        writer.add_tensor(f"blk.{block}.ffn_up.weight", np.zeros(250 * (block + 1), np.float32))
    writer.add_tensor("token_embd.weight", np.zeros(4000, np.float32))  # 16000 bytes
    writer.add_tensor("output_norm.weight", np.zeros(10, np.float32))  # 40 bytes
    if quantized:  # Q4_0: 18 bytes per 32 weights; 32 rows of 64 weights = 1152 bytes
        raw = np.zeros((32, 36), np.uint8)
        writer.add_tensor("output.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    elif not tied:
        writer.add_tensor("output.weight", np.zeros(2000, np.float32))  # 8000 bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def small(tmp_path: Path) -> GgufFacts:
    return read_facts(write_model(tmp_path / "small.gguf"))


def test_the_header_facts(small: GgufFacts) -> None:
    assert small.block_count == 4 and small.head_count_kv == (4, 4, 4, 4)
    assert small.key_length == small.value_length == 16  # n_embd / n_head
    assert small.layer_bytes == (1000, 2000, 3000, 4000)
    assert small.output_bytes == 8040 and small.input_bytes == 16000
    assert small.context_length == 131072 and small.vocab_size == 32


def test_full_offload_takes_every_block_and_the_output(small: GgufFacts) -> None:
    for gpu_layers in (None, -1, 5, 99):
        need = estimate(small, ModelConfig(gpu_layers=gpu_layers, context_length=100))
        assert need.weights == 1000 + 2000 + 3000 + 4000 + 8040, gpu_layers
        assert need.offloaded == need.layers == 5


def test_partial_offload_takes_the_output_and_the_last_blocks(small: GgufFacts) -> None:
    # llama.cpp: with N layers, the output layer and the last N-1 blocks go to the GPU.
    need = estimate(small, ModelConfig(gpu_layers=3, context_length=100))
    assert need.weights == 8040 + 3000 + 4000
    assert need.offloaded == 3
    only_output = estimate(small, ModelConfig(gpu_layers=1, context_length=100))
    assert only_output.weights == 8040 and only_output.kv_cache == 0
    assert estimate(small, ModelConfig(additional_args=["-ngl", "2"])).weights == 8040 + 4000


def test_zero_offload_needs_no_gpu(small: GgufFacts) -> None:
    need = estimate(small, ModelConfig(gpu_layers=0))
    assert need.total == 0 and need.offloaded == 0


def test_kv_cache_of_llama_8b_matches_llama_cpp(tmp_path: Path) -> None:
    facts = read_facts(write_model(tmp_path / "8b.gguf", **LLAMA_8B))
    # llama.cpp logs "CUDA0 KV buffer size = 512.00 MiB" for this model at -c 4096 (f16).
    assert estimate(facts, ModelConfig(context_length=4096)).kv_cache == 512 * MiB
    assert estimate(facts, ModelConfig(context_length=32768)).kv_cache == 4096 * MiB
    # No context_length: llama-server allocates the trained context (here 128k).
    assert estimate(facts, ModelConfig()).kv_cache == 16384 * MiB


def test_quantized_kv_cache(tmp_path: Path) -> None:
    facts = read_facts(write_model(tmp_path / "8b.gguf", **LLAMA_8B))
    q8 = estimate(facts, ModelConfig(context_length=4096, additional_args=["-ctk", "q8_0"]))
    # 128 Mi elements each for K and V: K at 34/32 bytes (q8_0), V still at 2 (f16).
    assert q8.kv_cache == 136 * MiB + 256 * MiB
    both = ModelConfig(context_length=4096, additional_args=["--cache-type-k=q4_0", "-ctv", "q4_0"])
    assert estimate(facts, both).kv_cache == 144 * MiB  # 18/32 bytes each
    with pytest.raises(EstimateError, match="unknown KV cache type 'q3_x'"):
        estimate(facts, ModelConfig(additional_args=["-ctk", "q3_x"]))


def test_no_kv_offload_keeps_the_cache_on_the_cpu(small: GgufFacts) -> None:
    need = estimate(small, ModelConfig(context_length=100, additional_args=["-nkvo"]))
    assert need.kv_cache == 0 and need.weights > 0


def test_quantized_and_tied_weights(tmp_path: Path) -> None:
    quantized = read_facts(write_model(tmp_path / "q.gguf", quantized=True))
    assert quantized.output_bytes == 1152 + 40
    tied = read_facts(write_model(tmp_path / "t.gguf", tied=True))
    assert tied.output_bytes == 16000 + 40  # the token embeddings, copied for the output


# llama.cpp's published CUDA compute buffers, flash attention off (docs/gpu-memory.md):
# Llama-3-8B at -c 8192: 560 MiB; Mistral-7B at 2048: 164 and at 32768: 2144; Llama-2-7B
# (32 KV heads, vocab 32000) at 4096: 296.
@pytest.mark.parametrize(
    ("header", "context", "published_mib"),
    [
        (LLAMA_8B, 8192, 560),
        ({**LLAMA_8B, "vocab": 32000}, 2048, 164),
        ({**LLAMA_8B, "vocab": 32000}, 32768, 2144),
        ({**LLAMA_8B, "kv_heads": 32, "vocab": 32000}, 4096, 296),
    ],
)
def test_compute_buffer_matches_published_figures(
    tmp_path: Path, header: dict[str, int], context: int, published_mib: int
) -> None:
    facts = read_facts(write_model(tmp_path / "m.gguf", **header))
    model = ModelConfig(context_length=context, additional_args=["-fa", "off"])  # as published
    assert estimate(facts, model).compute == published_mib * MiB


def test_flash_attention_and_overhead(small: GgufFacts) -> None:
    # llama-server's default (-fa auto) turns flash attention on where the GPU supports it:
    # the attention scores are never materialised; -fa off counts them.
    need = estimate(small, ModelConfig(context_length=1024))
    off = estimate(small, ModelConfig(context_length=1024, additional_args=["-fa", "off"]))
    on = estimate(small, ModelConfig(context_length=1024, additional_args=["-fa", "on"]))
    assert on.compute == need.compute
    scores = 4 * 512 * 1024 * 4  # f32, every one of the 4 heads, the whole context
    assert off.compute - need.compute == scores - 4 * 512 * 32  # the logits remain
    assert need.overhead == PROCESS_OVERHEAD
    assert need.total == need.weights + need.kv_cache + need.compute + need.overhead


def test_flag_values() -> None:
    assert flag_value(["-c", "4096"], ("-c", "--ctx-size")) == "4096"
    assert flag_value(["--ctx-size=8192", "-c", "16"], ("-c", "--ctx-size")) == "16"
    assert flag_value(["-nkvo"], ("-nkvo",)) == ""
    assert flag_value(["-t", "4"], ("-c",)) is None
    assert offloaded_layers("all", 32) == offloaded_layers("auto", 32) == 33


def test_gpu_fraction() -> None:
    assert gpu_fraction(7 * 1024**3, 24 * 1024**3) == 0.3  # 0.2917 rounded up
    assert gpu_fraction(1, 24 * 1024**3) == 0.01
    assert gpu_fraction(30 * 1024**3, 24 * 1024**3) == 2.0  # whole GPUs
    assert gpu_fraction(24 * 1024**3, 24 * 1024**3) == 1.0
    assert gpu_fraction(0, 24 * 1024**3) == 0.0


CUDA_LOG = """
load_tensors: offloaded 33/33 layers to GPU
load_tensors:   CPU_Mapped model buffer size =   281.81 MiB
load_tensors:        CUDA0 model buffer size =  4403.49 MiB
llama_context:  CUDA_Host  output buffer size =     0.49 MiB
llama_kv_cache:      CUDA0 KV buffer size =   512.00 MiB
sched_reserve:      CUDA0 compute buffer size =   258.50 MiB
sched_reserve:  CUDA_Host compute buffer size =    16.01 MiB
common_params_fit_impl: projected to use 5432 MiB of device memory vs. 24000 MiB free
"""


def test_measured_buffers_from_a_cuda_load_log() -> None:
    measured = parse_load_log(CUDA_LOG)
    assert measured is not None
    assert measured.buffers["CUDA0"] == {
        "model": round(4403.49 * MiB),
        "kv": 512 * MiB,
        "compute": round(258.5 * MiB),
    }
    assert measured.gpu == round(4403.49 * MiB) + 512 * MiB + round(258.5 * MiB)
    assert measured.on("CPU") > 281 * MiB  # the mapped weights and host buffers
    assert measured.projected == 5432 * MiB


def test_a_log_without_buffers_measures_nothing() -> None:
    assert parse_load_log("srv load_model: loading model\n") is None


def test_a_measurement_is_good_for_its_file_and_memory_flags_only(small: GgufFacts) -> None:
    base = calibration_key(small, ModelConfig(context_length=4096))
    assert base == calibration_key(small, ModelConfig(context_length=4096, threads=8))
    others = [
        ModelConfig(context_length=8192),
        ModelConfig(context_length=4096, gpu_layers=2),
        ModelConfig(context_length=4096, additional_args=["-ctk", "q8_0"]),
        ModelConfig(context_length=4096, additional_args=["-fa", "on"]),
        ModelConfig(context_length=4096, additional_args=["--n-cpu-moe", "8"]),
        ModelConfig(context_length=4096, additional_args=["-ot", "exps=CPU"]),
    ]
    assert len({base, *(calibration_key(small, m) for m in others)}) == 1 + len(others)


def test_a_model_split_over_files_is_read_whole(tmp_path: Path) -> None:
    first = write_model(tmp_path / "big-00001-of-00002.gguf", blocks=4)
    second = gguf.GGUFWriter(str(tmp_path / "big-00002-of-00002.gguf"), "llama")
    second.add_tensor("blk.3.ffn_down.weight", np.zeros(2500, np.float32))  # 10000 bytes
    second.write_header_to_file()
    second.write_kv_data_to_file()
    second.write_tensors_to_file()
    second.close()
    facts = read_facts(first)
    assert facts.layer_bytes == (1000, 2000, 3000, 4000 + 10000)
    (tmp_path / "big-00002-of-00002.gguf").unlink()
    (tmp_path / "big-00001-of-00002.gguf").touch()  # a new mtime: read again
    with pytest.raises(GgufError, match=r"big-00002-of-00002\.gguf: a part of"):
        read_facts(first)
