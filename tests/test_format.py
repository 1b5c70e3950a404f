"""The Endor format: hand-built cases, lossless round trips, sizes, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from endor_ray import format as fmt
from endor_ray.errors import FormatError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(fmt.BITS_DTYPES[a.dtype]), b.view(fmt.BITS_DTYPES[b.dtype])
    )


def random_sparse(shape, dtype, sparsity, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).to(dtype)
    drop = torch.rand(shape, generator=generator) < sparsity
    return weight.masked_fill(drop, 0)


def test_hand_built_example():
    # Elements 1, 4 and 8 are non-zeros; -0.0 at element 9 is a non-zero too.
    weight = torch.tensor([0, 1.5, 0, 0, 2, 0, 0, 0, 3, -0.0], dtype=torch.float16)
    enc = fmt.encode(weight, block_size=256, layout="bitmap")
    assert enc.bitmap.tolist() == [0b0001_0010, 0b0000_0011]  # LSB first
    assert enc.block_offsets.tolist() == [0, 4]
    assert enc.values.view(torch.int16).tolist() == torch.tensor([1.5, 2, 3, -0.0], dtype=torch.float16).view(torch.int16).tolist()
    assert enc.nnz == 4
    assert enc.nbytes == 4 * 2 + 2 + 8 * 2
    assert bits_equal(fmt.decode(enc), weight)


def test_block_offsets_are_per_block_prefix():
    weight = torch.zeros(3 * 256 + 10)
    weight[[0, 1, 300, 700, 770, 775]] = 1.0
    enc = fmt.encode(weight, block_size=256, layout="bitmap")
    assert enc.block_offsets.tolist() == [0, 2, 3, 4, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(1,), (7,), (255,), (256,), (33, 257), (3, 5, 700)])
def test_round_trip_bit_identical(dtype, sparsity, shape):
    weight = random_sparse(shape, dtype, sparsity)
    for layout in ("bitmap", "dense", None):
        enc = fmt.encode(weight, block_size=256, layout=layout)
        decoded = fmt.decode(enc)
        assert bits_equal(decoded, weight), (layout, enc.layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_and_nan_survive(dtype):
    weight = torch.zeros(1000, dtype=dtype)
    weight[3] = -0.0
    weight[10] = float("nan")
    weight[11] = float("-inf")
    bits = weight.view(fmt.BITS_DTYPES[dtype])
    bits[12] = 0x7C01 if dtype == torch.float16 else bits[10] | 1  # a NaN with another payload
    enc = fmt.encode(weight, layout="bitmap")
    assert enc.nnz == 4
    assert bits_equal(fmt.decode(enc), weight)


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(min_value=0, max_value=5000),
    sparsity=st.floats(min_value=0.0, max_value=1.0),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([256, 512, 4096]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(numel, sparsity, dtype, block_size, seed):
    weight = random_sparse((numel,), dtype, sparsity, seed)
    enc = fmt.encode(weight, block_size=block_size, layout="bitmap")
    fmt.validate(enc)
    assert enc.nbytes == fmt.bitmap_nbytes(numel, enc.nnz, dtype.itemsize, block_size)
    assert bits_equal(fmt.decode(enc), weight)


def test_size_at_half_sparsity_fp16():
    weight = random_sparse((1024, 4096), torch.float16, 0.5)
    enc = fmt.encode(weight)
    assert enc.layout == "bitmap"
    ideal = enc.nnz * 2 + enc.numel / 8 + 8 * (enc.num_blocks + 1)
    assert enc.nbytes <= 1.01 * ideal
    assert enc.nbytes / enc.dense_nbytes <= 0.565


def test_too_dense_is_stored_dense():
    weight = random_sparse((64, 64), torch.float16, 0.02)
    enc = fmt.encode(weight)
    assert enc.layout == "dense" and enc.nbytes == enc.dense_nbytes
    sparse = fmt.encode(random_sparse((64, 64), torch.float16, 0.5))
    assert sparse.layout == "bitmap"


def test_unsupported_dtype_and_block_size():
    with pytest.raises(FormatError, match="int32"):
        fmt.encode(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(FormatError, match="power of two"):
        fmt.encode(torch.zeros(4), block_size=1000)


def _with(enc: fmt.EncodedTensor, **changes) -> fmt.EncodedTensor:
    fields = {name: getattr(enc, name) for name in enc.__dataclass_fields__}
    return fmt.EncodedTensor(**{**fields, **changes})


def test_validate_rejects_inconsistent_tensors():
    enc = fmt.encode(random_sparse((600,), torch.float32, 0.5), block_size=256, layout="bitmap")
    with pytest.raises(FormatError, match="values"):
        fmt.decode(_with(enc, values=enc.values[:-1]))
    with pytest.raises(FormatError, match="block_offsets"):
        fmt.decode(_with(enc, block_offsets=enc.block_offsets[:-1]))
    bad_offsets = enc.block_offsets.clone()
    bad_offsets[-1] += 1
    with pytest.raises(FormatError, match="block offsets run"):
        fmt.decode(_with(enc, block_offsets=bad_offsets))
    bad_bitmap = enc.bitmap.clone()
    bad_bitmap[0] ^= 0xFF
    with pytest.raises(FormatError, match="set bits"):
        fmt.decode(_with(enc, bitmap=bad_bitmap))
    with pytest.raises(FormatError, match="values encoding"):
        fmt.decode(_with(enc, values_encoding="int2"))


def test_checksum_sees_every_part():
    enc = fmt.encode(random_sparse((2000,), torch.bfloat16, 0.5), block_size=256, layout="bitmap")
    base = fmt.checksum(enc)
    for name in ("bitmap", "block_offsets", "values"):
        part = getattr(enc, name).clone()
        part.view(torch.uint8)[-1] ^= 1
        assert fmt.checksum(_with(enc, **{name: part})) != base, name


def test_sizes_follow_the_spec_formula():
    assert fmt.bitmap_nbytes(numel=8192 * 8192, nnz=8192 * 4096, itemsize=2) == (
        8192 * 4096 * 2 + 8192 * 8192 // 8 + 8 * (math.ceil(8192 * 8192 / 4096) + 1)
    )
