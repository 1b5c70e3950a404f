"""The fast CPU decoder against the torch reference decode: bit for bit, every implementation the
CPU runs, one thread and several, and never a read outside the arrays on damaged input."""

import dataclasses
import logging
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- quantized values ("int8" / "int4" codes with group scales) ----------------------------------

ENCODINGS = ["int8", "int4"]
LAYOUTS = ["bitmap", "dense"]


def assert_matches_reference(enc, threads=(1,), isas=None):
    """Every implementation the CPU runs (or `isas`), each thread count: the reference's bits."""
    reference = decode(enc)
    for isa in isas or cpu_decode.supported_isas(enc.dtype.itemsize):
        for count in threads:
            out = torch.full(enc.shape, 7.0, dtype=enc.dtype)  # stale contents must be overwritten
            assert cpu_decode.decode_into(enc, out, threads=count, isa=isa) is out
            assert bits_equal(out, reference), f"{isa}, {count} threads"


@pytest.mark.parametrize("group_size", [1, 3, 16, 128, 1000])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_matches_reference(dtype, encoding, layout, group_size):
    # 1-D, 0-d, ragged groups (257, 1000, 31 columns against G), several blocks, a 3-D tensor
    for shape in [(), (1,), (31,), (1000,), (33, 257), (4, 3, 1000), (2, 5, 31)]:
        weight = random_sparse(shape, dtype, 0.5, seed=sum(shape) + group_size)
        enc = encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=group_size)
        assert_matches_reference(enc)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_and_the_largest_blocks(dtype, encoding):
    """Dense rows longer than the C side's int4 unpacking chunk (4096), groups across it; bitmap
    blocks of 65536 elements (the largest staging buffer)."""
    weight = random_sparse((2, 9001), dtype, 0.4, seed=8)
    for group_size in (3, 1000):
        for layout, block_size in (("dense", 4096), ("bitmap", 65536)):
            enc = encode(weight, block_size=block_size, layout=layout, encoding=encoding, group_size=group_size)
            assert_matches_reference(enc)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_threads_split_blocks_or_rows(dtype, encoding, layout, threads):
    weight = random_sparse((150, 350), dtype, 0.6, seed=threads)  # 206 blocks, beginning inside rows
    enc = encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=100)
    calls = []
    original = cpu_decode._dequant_rows if layout == "dense" else cpu_decode._dequant_blocks

    def counted(*args):
        calls.append(args[-2:])
        return original(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_decode, "_dequant_rows" if layout == "dense" else "_dequant_blocks", counted)
        assert_matches_reference(enc, threads=(threads,))
    assert len(calls) == threads * len(cpu_decode.supported_isas(dtype.itemsize))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_odd_counts_and_blocks_starting_on_a_high_nibble(dtype, layout):
    weight = random_sparse((3, 341), dtype, 0.0, seed=5)  # 1023 elements, 341 per row: rows start odd
    weight.view(-1)[[0, 700]] = 0  # 255 values in block 0: block 1 starts on an odd value; nnz 1021
    enc = encode(weight, block_size=256, layout=layout, encoding="int4", group_size=5)
    if layout == "bitmap":
        assert enc.nnz % 2 == 1 and enc.block_offsets[1] % 2 == 1 and enc.row_offsets[2] % 2 == 1
    assert enc.values.numel() == (enc.value_count + 1) // 2
    assert_matches_reference(enc)
    # codes and scales at odd addresses inside larger buffers, as in a store file
    codes = torch.zeros(enc.values.numel() + 1, dtype=torch.uint8)
    codes[1:] = enc.values
    scales = torch.zeros(enc.scales.numel() + 1, dtype=dtype)
    scales[1:] = enc.scales
    assert_matches_reference(dataclasses.replace(enc, values=codes[1:], scales=scales[1:]))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_all_zero_tensors_negative_zero_and_nan(dtype, encoding):
    weight = random_sparse((7, 50), dtype, 0.3, seed=2)
    weight[[0, 3, 6]] = 0  # empty rows, the first and last among them
    weight[1, [0, 9]] = -0.0
    weight[2, [4, 49]] = float("nan")  # NaN codes to 0: kept, decoded +0.0
    for layout in LAYOUTS:
        for candidate in (weight, torch.zeros_like(weight), torch.zeros(1000, dtype=dtype)):
            enc = encode(candidate, block_size=256, layout=layout, encoding=encoding, group_size=8)
            assert_matches_reference(enc)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_against_scales_of_every_kind(dtype, encoding, layout):
    """Random codes (-128 / -8 included) times random scale bit patterns: subnormals, products that
    overflow to infinity, and (non-finite scales, which no encoder writes) infinities and NaNs."""
    generator = torch.Generator().manual_seed(7)
    weight = random_sparse((64, 100), dtype, 0.5, seed=3)
    enc = encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=9)
    codes = torch.randint(0, 256, (enc.values.numel(),), dtype=torch.uint8, generator=generator)
    bits = torch.randint(-(2**31), 2**31 - 1, (enc.scales.numel(),), dtype=torch.int32, generator=generator)
    scales = bits.view(torch.float32) if dtype == torch.float32 else bits.to(torch.int16).view(dtype)
    tiny = torch.tensor([1e-45 if dtype == torch.float32 else 1e-40 if dtype == torch.bfloat16 else 1e-7])
    scales[::5] = tiny.to(dtype)  # subnormal scales: subnormal products
    scales[::7] = torch.finfo(dtype).max  # overflow to infinity
    scales[::11] = float("inf")  # code 0 times infinity: NaN
    scales[::13] = float("nan")
    values = codes.view(torch.int8) if encoding == "int8" else codes
    assert_matches_reference(dataclasses.replace(enc, values=values, scales=scales))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    group_size=st.sampled_from([1, 2, 3, 7, 16, 33, 128, 1000]),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from(DTYPES),
    encoding=st.sampled_from(ENCODINGS),
    layout=st.sampled_from(LAYOUTS),
    block_size=st.sampled_from([256, 512]),
    seed=st.integers(0, 2**16),
)
def test_quantized_property(shape, group_size, sparsity, dtype, encoding, layout, block_size, seed):
    weight = random_sparse(tuple(shape), dtype, sparsity, seed=seed)
    enc = encode(weight, block_size=block_size, layout=layout, encoding=encoding, group_size=group_size)
    assert_matches_reference(enc)


def damaged(enc, **parts):
    return dataclasses.replace(enc, **{name: change(getattr(enc, name).clone()) for name, change in parts.items()})


def set_at(index, value):
    def change(array):
        array[index] = value
        return array
    return change


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_damaged_quantized_bitmap_is_refused_without_reading_outside(isa, encoding):
    isa_or_skip(isa, torch.bfloat16)
    weight = random_sparse((120, 300), torch.bfloat16, 0.5, seed=4)  # 141 blocks: two threads
    enc = encode(weight, block_size=256, layout="bitmap", encoding=encoding, group_size=16)
    nnz = enc.nnz
    cases = [
        # row 0 takes every value: its groups run past its scales
        (dict(row_offsets=set_at(1, nnz + 10**6)), "outside the rows of the row offsets, or its scale outside"),
        (dict(row_offsets=set_at(1, 2**62)), "scale outside the [0-9]+ scales"),
        (dict(row_offsets=set_at(5, -3)), "outside the rows"),
        (dict(row_offsets=set_at(-1, nnz - 1)), "row offsets run"),
        (dict(row_offsets=set_at(-1, nnz + 1)), "row offsets run"),
        (dict(row_offsets=set_at(slice(20, None), nnz)), "outside the rows"),  # the last rows' values have no row
        (dict(bitmap=set_at(slice(None), 0xFF)), "sets more bits"),
        (dict(bitmap=set_at(slice(0, 40), 0)), "sets fewer bits"),
        (dict(block_offsets=set_at(9, nnz + 10)), "block offsets of blocks .* lie outside"),
        (dict(block_offsets=set_at(9, -1)), "block offsets of blocks .* lie outside"),
        (dict(block_offsets=set_at(-1, nnz + 1)), "block offsets run"),
        (dict(scales=lambda s: s[:-1]), "scales|divide"),  # caught by validate
        (dict(scales=lambda s: s[:-40]), "scales"),
        (dict(values=lambda v: v[:-1]), "values should be"),
    ]
    for parts, message in cases:
        with pytest.raises(FormatError, match=message):
            cpu_decode.decode_into(damaged(enc, **parts), torch.empty_like(weight), isa=isa, threads=2)
    with pytest.raises(FormatError, match="scale outside the"):  # scales fitting a larger group size
        cpu_decode.decode_into(dataclasses.replace(enc, group_size=4), torch.empty_like(weight), isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_damaged_quantized_dense_is_refused(isa, encoding):
    isa_or_skip(isa, torch.float16)
    weight = random_sparse((40, 300), torch.float16, 0.0, seed=6)
    enc = encode(weight, layout="dense", encoding=encoding, group_size=16)
    for parts in (dict(scales=lambda s: s[:-1]), dict(values=lambda v: v[:-1])):
        with pytest.raises(FormatError, match="should be"):
            cpu_decode.decode_into(damaged(enc, **parts), torch.empty_like(weight), isa=isa)
    with pytest.raises(FormatError, match="scales should be"):
        cpu_decode.decode_into(dataclasses.replace(enc, group_size=17), torch.empty_like(weight), isa=isa)


def test_quantized_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_lib", None)
    monkeypatch.setattr(cpu_decode, "_load_error", "not built (test)")
    for layout in LAYOUTS:
        enc = encode(random_sparse((30, 70), torch.float16, 0.5), block_size=256, layout=layout, encoding="int4")
        assert bits_equal(cpu_decode.decode_into(enc, torch.empty(30, 70, dtype=torch.float16)), decode(enc))
