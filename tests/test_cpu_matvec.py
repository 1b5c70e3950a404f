"""The CPU products straight from the blocks (`endor_ray.format.cpu_matvec`): each implementation
bit for bit against an independent numpy model of the spec (the reference decode's weights, 32
lanes of float32 fused multiply-adds, a fixed tree), close to the float64 product, ragged shapes,
and refusals that read nothing. The k-types (q4_k, q5_k, q6_k) also on random block bytes, so
that every code, 6-bit scale/minimum and fifth/high bit pattern meets the product."""

import dataclasses

import numpy as np
import pytest
import torch

from endor_ray.errors import FormatError
from endor_ray.format import encode
from endor_ray.format import cpu_matvec
from endor_ray.format.cpu_matvec import has_matvec, matvec, supported_isas
from endor_ray.format.gguf_blocks import BLOCK_TYPES
from endor_ray.format.tensor import decode

ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GGUF = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
GGUF_K = ["q4_k", "q5_k", "q6_k"]
K_SCALE_OFFSETS = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # each super-block's f16 scales


def isa_or_skip(isa: str) -> str:
    if isa not in supported_isas():
        pytest.skip(f"this CPU (or build) has no {isa} product")
    return isa


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c with one rounding (IEEE fusedMultiplyAdd), from exact float64 pieces: the
    product is exact in float64, TwoSum gives the sum's error, and only a float32 tie can need it."""
    product = a.astype(np.float64) * b.astype(np.float64)
    total = product + c.astype(np.float64)
    back = total - product
    error = (product - (total - back)) + (c.astype(np.float64) - back)
    rounded = total.astype(np.float32)
    off = total - rounded.astype(np.float64)
    other = np.nextafter(rounded, np.where(off > 0, np.float32(np.inf), np.float32(-np.inf)))
    tie = (off != 0) & (2 * off == other.astype(np.float64) - rounded.astype(np.float64))
    return np.where(tie & (error != 0) & (np.sign(error) == np.sign(off)), other, rounded)


def spec_matvec(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[x_rows, rows] float32 as _matvec.c's comment defines the sum, in numpy."""
    w, xs = weights.float().numpy(), x.numpy()
    rows, cols = w.shape
    acc = np.zeros((xs.shape[0], rows, 32), dtype=np.float32)
    for c0 in range(0, cols, 32):
        count = min(32, cols - c0)
        acc[:, :, :count] = fma32(w[None, :, c0:c0 + count], xs[:, None, c0:c0 + count], acc[:, :, :count])
    step = 16
    while step:
        acc[:, :, :step] = acc[:, :, :step] + acc[:, :, step:2 * step]
        step //= 2
    return torch.from_numpy(acc[:, :, 0].copy())


def check(enc, x_rows: int, isa: str, threads: int = 1, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(x_rows, enc.shape[1], generator=generator)
    weights = decode(enc)
    got = matvec(enc, x, threads=threads, isa=isa)
    assert torch.equal(got, spec_matvec(weights, x))
    exact = x.double() @ weights.double().T
    bound = 2 * enc.shape[1] * 2.0 ** -24 * (x.double().abs() @ weights.double().abs().T) + 1e-30
    assert bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding,group_size", [("int8", 32), ("int8", 128), ("int8", 7), ("int4", 32),
                                                 ("int4", 16), ("int4", 5)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (33, 50), (17, 64), (5, 97)])
def test_group_encodings_match_the_spec(isa, dtype, encoding, group_size, shape):
    isa_or_skip(isa)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    enc = encode(weight, layout="dense", encoding=encoding, group_size=group_size)
    for x_rows in (1, 2, 4, 5, 9):
        check(enc, x_rows, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", GGUF)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96)])
def test_gguf_blocks_match_the_spec(isa, dtype, encoding, shape):
    isa_or_skip(isa)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    enc = encode(weight, layout="dense", encoding=encoding)
    for x_rows in (1, 3, 4, 6):
        check(enc, x_rows, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", GGUF_K)
@pytest.mark.parametrize("shape", [(1, 256), (7, 512), (33, 768)])
def test_k_blocks_match_the_spec(isa, dtype, encoding, shape):
    isa_or_skip(isa)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    enc = encode(weight, layout="dense", encoding=encoding)
    for x_rows in (1, 3, 4, 6, 9):
        check(enc, x_rows, isa)


def random_k_blocks(encoding: str, rows: int, cols: int, dtype: torch.dtype, seed: int):
    """A [rows, cols] k-type tensor of random block bytes (every bit pattern a quantizer might not
    write), its f16 scales random finite values small enough that no weight overflows fp16."""
    block = BLOCK_TYPES[encoding]
    generator = torch.Generator().manual_seed(seed)
    num_blocks = rows * cols // block.block_elems
    blocks = torch.randint(0, 256, (num_blocks, block.type_size), dtype=torch.uint8, generator=generator)
    for offset in K_SCALE_OFFSETS[encoding]:
        scales = (torch.randn(num_blocks, generator=generator) * 0.01).to(torch.float16)
        blocks[:, offset:offset + 2] = scales.view(torch.uint8).view(num_blocks, 2)
    tile = encode(torch.zeros(rows, cols), layout="dense", encoding=encoding)
    return dataclasses.replace(tile, values=blocks.reshape(-1), dtype=dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", GGUF_K)
def test_k_blocks_of_random_bytes_match_the_spec(isa, dtype, encoding):
    isa_or_skip(isa)
    enc = random_k_blocks(encoding, 24, 512, dtype, seed=5)
    weights = decode(enc)
    assert bool(weights.float().isfinite().all()) and weights.dtype == dtype
    for x_rows in (1, 2, 5):
        check(enc, x_rows, isa, seed=x_rows)


def test_k_types_over_flattened_elements_have_no_product():
    """[4, 576] q4_k: 9 super-blocks over the flattened elements, two of them spanning rows: decoded,
    and the C side refuses such a shape itself (cols % 256 != 0) rather than read the blocks as rows."""
    for encoding in GGUF_K:
        enc = encode(torch.randn(4, 576), layout="dense", encoding=encoding)
        assert not has_matvec(enc)
        assert not cpu_matvec.stored_for_matvec("dense", encoding, [4, 576])
        assert cpu_matvec.stored_for_matvec("dense", encoding, [4, 512])
        with pytest.raises(FormatError, match="no CPU product"):
            matvec(enc, torch.randn(1, 576))


def test_the_c_side_refuses_k_rows_that_are_not_whole_super_blocks(monkeypatch):
    enc = encode(torch.randn(4, 576), layout="dense", encoding="q6_k")
    monkeypatch.setattr(cpu_matvec, "stored_for_matvec", lambda *args: True)
    with pytest.raises(FormatError, match="refused.*status -2"):
        matvec(enc, torch.randn(1, 576))


@pytest.mark.parametrize("encoding", ["int8", "int4", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k"])
def test_threads_split_rows_without_changing_bits(encoding):
    weight = torch.randn(600, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    enc = encode(weight, layout="dense", encoding=encoding, **({"group_size": 32} if encoding.startswith("int") else {}))
    x = torch.randn(2, 512)
    one = matvec(enc, x, threads=1)
    assert torch.equal(one, matvec(enc, x, threads=4))
    assert torch.equal(one, spec_matvec(decode(enc), x))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("encoding", ["int8", "int4", "q8_0", "q4_0", "q4_1", "q5_1"])
def test_non_finite_scales_give_the_spec_nans_and_infinities(isa, dtype, encoding):
    """A NaN or infinite scale (a tampered or overflowed file) makes its weights NaN or infinite in every
    loop as in the reference decode (the NaNs in the same outputs, every other output the same bits)."""
    isa_or_skip(isa)
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    enc = encode(weight, layout="dense", encoding=encoding, **({"group_size": 32} if encoding.startswith("int") else {}))
    if encoding.startswith("int"):
        scales = enc.scales.clone()
        scales[0], scales[3], scales[5] = float("nan"), float("inf"), float("-inf")
        enc = dataclasses.replace(enc, scales=scales)
    else:  # each block's f16 scale d first: NaN, +inf, -inf in three of the twelve blocks
        values, size = enc.values.clone(), BLOCK_TYPES[encoding].type_size
        for block, bits in ((0, 0x7E00), (3, 0x7C00), (5, 0xFC00)):
            values[block * size:block * size + 2] = torch.tensor([bits & 0xFF, bits >> 8], dtype=torch.uint8)
        enc = dataclasses.replace(enc, values=values)
    weights = decode(enc)
    assert not bool(weights.float().isfinite().all())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    got, want = matvec(enc, x, isa=isa), spec_matvec(weights, x)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got.isnan().any())
    assert torch.equal(torch.nan_to_num(got, nan=0.0), torch.nan_to_num(want, nan=0.0))


def test_large_values_keep_every_weight_exact():
    """Scales at the dtype's extremes: each weight is the decoded one (a product off by a rounding of
    a weight would miss the spec model, whose weights come from the torch decode)."""
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * 3e4
    for dtype in DTYPES:
        for encoding in ("int8", "int4"):
            enc = encode(weight.to(dtype), layout="dense", encoding=encoding, group_size=32)
            check(enc, 1, "avx512" if "avx512" in supported_isas() else "scalar")


def test_only_dense_product_encodings_have_one():
    weight = torch.randn(16, 64)
    weight[weight.abs() < 1] = 0
    assert not has_matvec(encode(weight, layout="bitmap", encoding="int8"))
    assert not has_matvec(encode(weight, layout="dense"))
    assert not has_matvec(encode(weight.view(4, 4, 64), layout="dense", encoding="int8"))
    assert has_matvec(encode(weight, layout="dense", encoding="int4"))
    with pytest.raises(FormatError, match="no CPU product"):
        matvec(encode(weight, layout="bitmap", encoding="int8"), torch.randn(1, 64))


def test_bad_inputs_are_refused_before_any_read():
    enc = encode(torch.randn(16, 64), layout="dense", encoding="q4_0")
    with pytest.raises(FormatError, match="x must be"):
        matvec(enc, torch.randn(1, 63))
    with pytest.raises(FormatError, match="x must be"):
        matvec(enc, torch.randn(1, 64, dtype=torch.float64))
    short = dataclasses.replace(enc, values=enc.values[:-18])
    with pytest.raises(FormatError):  # validate() or the C side's own size check
        matvec(short, torch.randn(1, 64))
    assert matvec(enc, torch.randn(0, 64)).shape == (0, 16)
    k_enc = encode(torch.randn(4, 256), layout="dense", encoding="q5_k")
    with pytest.raises(FormatError):
        matvec(dataclasses.replace(k_enc, values=k_enc.values[:-176]), torch.randn(1, 256))
