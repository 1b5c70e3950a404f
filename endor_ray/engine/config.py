"""How the engine places and streams layers: one dataclass, validated when it is made."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from endor_ray.errors import ConfigError
from endor_ray.utils.units import parse_budget


@dataclass
class EngineConfig:
    """How the engine places and streams layers."""

    device: str = "auto"  # "cuda", "cuda:N", "cpu", or "auto" (CUDA when available)
    # Device tier: a size ("8GiB": resident layers + streaming slots) or a layer count ("12").
    # None: on CUDA as many layers as 90% of free memory holds; on CPU as many as half the
    # available memory holds (a model that fits is decoded once and never streamed).
    gpu_memory: str | int | None = None
    host_memory: str | int | None = None  # compressed layers kept in host memory (size); None: all
    prefetch_depth: int = 2  # layers fetched ahead of the one computing
    verify_disk_reads: bool = True  # checksum every disk-tier read (host tier is checked at load)
    # Disk-tier reads: "buffered" (through the page cache, each file's pages dropped once read: a model
    # larger than memory must not fill it), "cached" (buffered, the pages left in the page cache, which
    # may keep layers in spare RAM) or "direct" (O_DIRECT: DMA into the read buffer, no CPU copy).
    disk_io: str = "buffered"
    decode_threads: int | None = None  # CPU decoding: threads a layer's decode splits over; None: all cores
    # CPU: weights stored as dense int8/int4 or q8_0/q4_0/q4_1/q5_0/q5_1/q4_k/q5_k/q6_k blocks stay so, and
    # small batches multiply straight from them (engine.block_weight); False: every layer decoded to dense first.
    cpu_matvec: bool = True
    # The dtype the model computes in; None: the store's. "float32" over a bf16/fp16 store moves the
    # same bytes but computes in fp32, so greedy answers no longer depend on what shares the batch
    # (bf16 rounding differs with the batch's shape), at twice the memory for dense weights.
    compute_dtype: str | None = None
    fetch_timeout_s: float = 600.0  # a layer fetch slower than this is an error, not a hang
    # MoE models: device memory for the expert cache (a size; "0": none). None: what --gpu-memory
    # leaves after the resident layers and the streaming slots (a layer count given: no limit).
    expert_cache_memory: str | None = None
    # MoE models: while a layer computes, read the experts the next layer's router would pick from this
    # layer's hidden state (a guess, verified when that layer runs: tokens never change)
    expert_prefetch: bool = True

    def __post_init__(self) -> None:
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.prefetch_depth < 0:
            raise ConfigError(f"prefetch depth must be >= 0, got {self.prefetch_depth}")
        if self.disk_io not in ("buffered", "cached", "direct"):
            raise ConfigError(f"disk_io must be buffered, cached or direct, got {self.disk_io!r}")
        if self.compute_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(f"compute_dtype must be float32, float16 or bfloat16, got {self.compute_dtype!r}")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ConfigError(f"decode threads must be >= 1, got {self.decode_threads}")
        self.gpu_budget  # parse now: a bad value fails at construction
        if parse_budget(self.expert_cache_memory, "expert cache memory")[1] not in (None, 0):
            raise ConfigError("expert cache memory is a size (for example 4GiB, or 0 for none), not a layer count")
        if parse_budget(self.host_memory, "host memory")[1] not in (None, 0):
            raise ConfigError("host memory is a size (for example 64GiB), not a layer count")

    @property
    def gpu_budget(self) -> tuple[int | None, int | None]:
        """(bytes, layers) of the device tier; at most one is set."""
        return parse_budget(self.gpu_memory, "GPU memory")

    @property
    def expert_cache_bytes(self) -> int | None:
        """The expert cache's explicit budget in bytes (None: derived from the GPU budget)."""
        cache_bytes, cache_layers = parse_budget(self.expert_cache_memory, "expert cache memory")
        return 0 if cache_layers == 0 else cache_bytes

    @property
    def host_budget_bytes(self) -> int | None:
        host_bytes, host_layers = parse_budget(self.host_memory, "host memory")
        return 0 if host_layers == 0 else host_bytes

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        return device
