"""How much GPU memory a model needs (DESIGN §10): estimated from its GGUF header and its flags
the way llama.cpp lays the model out, or measured from what llama-server reported it allocated.
Pure: the header comes in as `GgufFacts`, the log as text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxifier.config import ModelConfig
from proxifier.gguf_facts import GgufFacts

MiB = 1024**2
GiB = 1024**3

# Bytes per element of the KV cache types llama-server takes (`-ctk/-ctv`): block size over
# elements per block, from ggml's type traits.
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
# What a CUDA process holds besides its buffers (context, cuBLAS workspace, kernels): typical
# figures are 250-500 MiB; calibration replaces the whole estimate with what was measured.
PROCESS_OVERHEAD = 300 * MiB
UBATCH = 512  # llama-server's default physical batch (-ub)

_FLAGS = {
    "gpu_layers": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
    "ctx": ("-c", "--ctx-size"),
    "ctk": ("-ctk", "--cache-type-k"),
    "ctv": ("-ctv", "--cache-type-v"),
    "ubatch": ("-ub", "--ubatch-size"),
    "flash_attn": ("-fa", "--flash-attn"),
    "no_kv_offload": ("-nkvo", "--no-kv-offload"),
}


class EstimateError(ValueError):
    """The flags name something the estimate cannot size (an unknown cache type)."""


@dataclass(frozen=True)
class MemoryNeed:
    """GPU memory of one llama-server process, by kind, in bytes."""

    weights: int
    kv_cache: int
    compute: int
    overhead: int
    offloaded: int  # layers on the GPU, of block_count + 1 (the output layer counts as one)
    layers: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


def flag_value(args: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last of these flags in a command line (`-c 4096`, `--ctx-size=4096`);
    a flag with no value after it (the last argument, or one followed by a flag) gives ""."""
    found: str | None = None
    for index, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name not in names:
            continue
        if equals:
            found = value
        elif index + 1 < len(args) and not args[index + 1].startswith("-"):
            found = args[index + 1]
        else:
            found = ""
    return found


def offloaded_layers(gpu_layers: int | str | None, block_count: int) -> int:
    """How many of the block_count + 1 layers llama.cpp puts on the GPU: unset, -1, "auto" or
    "all" mean all of them (llama-server's default fits all it can)."""
    if gpu_layers is None or gpu_layers in ("auto", "all", ""):
        return block_count + 1
    try:
        count = int(gpu_layers)
    except ValueError:  # llama-server refuses it; the estimate assumes the most
        return block_count + 1
    return block_count + 1 if count < 0 else min(count, block_count + 1)


def estimate(facts: GgufFacts, model: ModelConfig) -> MemoryNeed:
    """The GPU memory llama-server will take for this file with this model's settings.

    llama.cpp keeps the input layer (token embeddings) on the CPU and, with N GPU layers,
    puts the output layer and the last N-1 blocks on the GPU; the KV cache of those blocks
    for the whole context (-c, shared by the parallel slots) goes with them unless -nkvo."""
    args = [str(a) for a in model.additional_args]
    ngl: int | str | None = model.gpu_layers
    if ngl is None:
        ngl = flag_value(args, _FLAGS["gpu_layers"])
    blocks = facts.block_count
    on_gpu = offloaded_layers(ngl, blocks)
    if on_gpu == 0:
        return MemoryNeed(0, 0, 0, 0, 0, blocks + 1)
    gpu_blocks = range(blocks - (on_gpu - 1), blocks)
    weights = facts.output_bytes + sum(facts.layer_bytes[i] for i in gpu_blocks)

    context = model.context_length or _int(flag_value(args, _FLAGS["ctx"])) or 0
    context = context or facts.context_length
    k_bytes = _kv_bytes(flag_value(args, _FLAGS["ctk"]))
    v_bytes = _kv_bytes(flag_value(args, _FLAGS["ctv"]))
    kv = 0
    if flag_value(args, _FLAGS["no_kv_offload"]) is None:
        kv = math.ceil(
            context
            * sum(
                _at(facts.head_count_kv, i, facts.head_count)
                * (facts.key_length * k_bytes + facts.value_length * v_bytes)
                for i in gpu_blocks
            )
        )
    ubatch = min(_int(flag_value(args, _FLAGS["ubatch"])) or UBATCH, max(context, 1))
    return MemoryNeed(
        weights,
        kv,
        compute_buffer(facts, context, ubatch, args),
        PROCESS_OVERHEAD,
        on_gpu,
        blocks + 1,
    )


def compute_buffer(facts: GgufFacts, context: int, ubatch: int, args: Sequence[str]) -> int:
    """llama.cpp's compute buffer: its allocator reuses memory across the graph, so the peak
    is the larger of one layer's attention scores (f32, every head, the whole context) and the
    logits (f32, the vocabulary), plus the mask and a few hidden states per micro-batch. With
    flash attention the scores are never materialised: llama-server's default (`-fa auto`)
    turns it on on every GPU it supports, so only `-fa off` counts them. With `-fa off` this
    matches llama.cpp's published CUDA figures: 164, 296, 560, 2094.5 and 2144 MiB (docs)."""
    scores = 0
    if flag_value(args, _FLAGS["flash_attn"]) in ("off", "0", "false"):
        scores = 4 * ubatch * context * facts.head_count
    logits = 4 * ubatch * facts.vocab_size
    mask = 4 * ubatch * context
    hidden = 16 * ubatch * facts.embedding_length
    return max(scores, logits) + mask + hidden


def calibration_key(facts: GgufFacts, model: ModelConfig) -> str:
    """What a measurement is good for: this file (path and size) with these settings. Every
    extra flag counts (tensor overrides, MoE offload, a projector, a draft model, splits all
    change the memory; one that does not only costs one more measured load)."""
    args = [str(a) for a in model.additional_args]
    ngl = model.gpu_layers
    if ngl is None:
        ngl = flag_value(args, _FLAGS["gpu_layers"])  # type: ignore[assignment]
    context = model.context_length or _int(flag_value(args, _FLAGS["ctx"])) or facts.context_length
    parts = [
        facts.path,
        str(facts.file_bytes),
        f"layers={offloaded_layers(ngl, facts.block_count)}",
        f"ctx={context}",
        f"embeddings={model.embeddings}",
        f"reranking={model.reranking}",
    ]
    return "|".join(parts + args)


def _kv_bytes(name: str | None) -> float:
    if name is None or name == "":
        return KV_TYPE_BYTES["f16"]
    try:
        return KV_TYPE_BYTES[name.lower()]
    except KeyError:
        known = ", ".join(KV_TYPE_BYTES)
        raise EstimateError(f"unknown KV cache type {name!r}; llama-server takes {known}") from None


def _at(values: tuple[int, ...], index: int, default: int) -> int:
    return values[index] if index < len(values) else default


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- measured
_BUFFER = re.compile(
    r"(?P<token>\b[A-Za-z][\w]*)\s+(?:(?P<kind>model|KV|compute|output)\s+)?"
    r"buffer size\s*=\s*(?P<mib>[\d.]+) MiB"
)
_PROJECTED = re.compile(r"projected to use (?P<mib>\d+) MiB of device memory")


@dataclass(frozen=True)
class Measured:
    """What llama-server's load log says it allocated: bytes by device, then kind (model, KV,
    compute, output), and llama.cpp's own projection when its fit step printed one."""

    buffers: dict[str, dict[str, int]]
    projected: int | None = None

    def on(self, device: str) -> int:
        return sum(self.buffers.get(device, {}).values())

    @property
    def gpu(self) -> int:
        """Everything on devices other than the CPU (CUDA0, ROCm0, Vulkan0, Metal...)."""
        return sum(self.on(d) for d in self.buffers if d != "CPU")


def parse_load_log(text: str) -> Measured | None:
    """The buffers in the load log of one llama-server process (at `-lv 4`; the default
    verbosity prints none), or None when it shows none (yet). Host-side mirrors (`CUDA_Host`,
    `CPU_Mapped`) count as CPU memory, which is where they are. A kind logged twice for one
    device (a context created again) counts once, as last logged."""
    buffers: dict[str, dict[str, int]] = {}
    for match in _BUFFER.finditer(text):
        token = match.group("token")
        device = "CPU" if token == "CPU" or token.endswith(("_Host", "_Mapped")) else token
        kind = (match.group("kind") or "model").lower()
        if token.endswith("_Host") and kind != "model":
            kind = f"{kind} (host)"  # a host copy beside the CPU's own buffer of that kind
        buffers.setdefault(device, {})[kind] = round(float(match.group("mib")) * MiB)
    projected = None
    for match in _PROJECTED.finditer(text):
        projected = int(match.group("mib")) * MiB
    return Measured(buffers, projected) if buffers else None
