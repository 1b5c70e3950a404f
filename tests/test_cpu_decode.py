"""The fast CPU decoder against the torch reference decode: bit for bit, every implementation the
CPU runs, one thread and several, and never a read outside the arrays on damaged input."""

import dataclasses
import logging
import sys

import pytest
import torch

import endor_ray.format
from endor_ray.errors import FormatError
from endor_ray.format import cpu_decode, encode
from endor_ray.format.tensor import decode

from test_format import DTYPES, bits_equal, random_sparse

ISAS = ["avx512", "avx2", "scalar"]


def isa_or_skip(isa: str, dtype: torch.dtype) -> str:
    if isa not in cpu_decode.supported_isas(dtype.itemsize):
        pytest.skip(f"this CPU (or build) has no {isa} path")
    return isa


def test_the_extension_is_built_here():
    """The README's set-up builds it on the development machine; without it CPU decoding is slow."""
    assert cpu_decode.backend(2) != "torch" and cpu_decode.backend(4) != "torch"
    assert "scalar" in cpu_decode.supported_isas(2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (256,), (1000,), (33, 257), (4, 3, 1000)])
def test_matches_reference(isa, dtype, sparsity, shape):
    isa_or_skip(isa, dtype)
    weight = random_sparse(shape, dtype, sparsity, seed=sum(shape))
    enc = encode(weight, block_size=256, layout="bitmap")
    out = torch.full_like(weight, 7.0)  # stale contents must be overwritten everywhere
    cpu_decode.decode_into(enc, out, isa=isa)
    assert bits_equal(out, decode(enc))
    assert bits_equal(out, weight)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_nan_and_unaligned_values(isa, dtype):
    isa_or_skip(isa, dtype)
    weight = random_sparse((5000,), dtype, 0.5, seed=1)
    weight[[3, 64, 4095]] = -0.0
    weight[[10, 4999]] = float("nan")
    enc = encode(weight, block_size=1024, layout="bitmap")
    # values starting at an odd element offset inside a larger buffer, as in a store file
    backing = torch.zeros(enc.nnz + 1, dtype=dtype)
    backing[1:] = enc.values
    enc = dataclasses.replace(enc, values=backing[1:])
    out = torch.empty_like(weight)
    cpu_decode.decode_into(enc, out, isa=isa)
    assert bits_equal(out, weight)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_split_by_blocks(threads, dtype):
    weight = random_sparse((700, 1000), dtype, 0.6, seed=threads)
    enc = encode(weight, block_size=256, layout="bitmap")  # 2735 blocks: every thread gets work
    out = torch.empty_like(weight)
    cpu_decode.decode_into(enc, out, threads=threads)
    assert bits_equal(out, weight)


def test_dense_layout_is_copied():
    weight = random_sparse((300, 7), torch.bfloat16, 0.5)
    enc = encode(weight, layout="dense")
    assert bits_equal(cpu_decode.decode_into(enc, torch.empty_like(weight)), weight)


@pytest.mark.parametrize("isa", ISAS)
def test_bitmap_with_extra_bits_is_refused_without_reading_past_values(isa):
    isa_or_skip(isa, torch.float16)
    weight = random_sparse((4096,), torch.float16, 0.5)
    enc = encode(weight, block_size=256, layout="bitmap")
    damaged = enc.bitmap.clone()
    damaged[:] = 0xFF  # every bit set: twice as many values as exist
    with pytest.raises(FormatError, match="sets more bits"):
        cpu_decode.decode_into(dataclasses.replace(enc, bitmap=damaged), torch.empty_like(weight), isa=isa)
    fewer = enc.bitmap.clone()
    fewer[0] = 0
    with pytest.raises(FormatError, match="bits where the offsets give"):
        cpu_decode.decode_into(dataclasses.replace(enc, bitmap=fewer), torch.empty_like(weight), isa=isa)


def test_offsets_outside_the_values_are_refused():
    weight = random_sparse((256 * 200,), torch.float32, 0.5)
    enc = encode(weight, block_size=256, layout="bitmap")
    offsets = enc.block_offsets.clone()
    offsets[100] = enc.nnz + 10
    with pytest.raises(FormatError, match="outside"):
        cpu_decode.decode_into(dataclasses.replace(enc, block_offsets=offsets), torch.empty_like(weight), threads=2)


def test_wrong_output_buffer_is_refused():
    enc = encode(random_sparse((64, 64), torch.float16, 0.5), block_size=256)
    with pytest.raises(FormatError, match="output buffer"):
        cpu_decode.decode_into(enc, torch.empty(64, 64, dtype=torch.float32))
    with pytest.raises(FormatError, match="output buffer"):
        cpu_decode.decode_into(enc, torch.empty(64, 128, dtype=torch.float16)[:, ::2])


def test_falls_back_to_torch_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(cpu_decode, "_lib", None)
    monkeypatch.setattr(cpu_decode, "_load_error", None)
    monkeypatch.setitem(sys.modules, "endor_ray.format._expand", None)  # import fails as if not built
    monkeypatch.delattr(endor_ray.format, "_expand", raising=False)
    weight = random_sparse((3000,), torch.bfloat16, 0.5)
    enc = encode(weight, block_size=256, layout="bitmap")
    with caplog.at_level(logging.WARNING, logger=cpu_decode.__name__):
        for _ in range(3):
            assert bits_equal(cpu_decode.decode_into(enc, torch.empty_like(weight)), weight)
    assert cpu_decode.backend() == "torch"
    assert len([r for r in caplog.records if "not built" in r.message]) == 1
