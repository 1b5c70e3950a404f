"""The GGUF block dequantization kernel under TRITON_INTERPRET=1 against gguf-py, bit for bit.

The oracle is gguf-py's own `gguf.quants.dequantize` (float32), rounded once to the output dtype
by torch: independent of the kernel and of the format's torch reference (checked against it too).
Block bytes are drawn at random with finite fp16 scales (every code, sub-block scale and high bit
pattern occurs), plus the blocks llama.cpp's quantizers write (gguf-py's and the format's).
"""

import gguf
import numpy as np
import pytest
import torch

from endor_ray.errors import FormatError
from endor_ray.format.gguf_blocks import BLOCK_TYPES, GGUF_ENCODINGS
from endor_ray.format.tensor import EncodedTensor, encode, gguf_tensor
from endor_ray.kernels.decompress import decompress, decompress_reference
from endor_ray.kernels.gguf_dequant import CHUNK, dequantize_gguf, dequantize_gguf_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
# Byte offsets of each type's fp16 scales within its block (gguf-py's dequantize_blocks splits)
FP16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
               "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q3_k": (108,), "q2_k": (80, 82), "iq4_nl": (0,)}


def qtype(encoding: str) -> gguf.GGMLQuantizationType:
    return getattr(gguf.GGMLQuantizationType, encoding.upper())


def random_blocks(encoding: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows * cols // block_elems * type_size] uint8: random bytes, every fp16 scale finite."""
    block_elems, type_size = BLOCK_TYPES[encoding].block_elems, BLOCK_TYPES[encoding].type_size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * cols // block_elems, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[encoding]:
        scale = blocks[:, offset: offset + 2].copy().view(np.uint16)
        scale[(scale & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/NaN exponent -> a finite one
        blocks[:, offset: offset + 2] = scale.view(np.uint8)
    return torch.from_numpy(blocks.reshape(-1))


def oracle(blocks: torch.Tensor, encoding: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """gguf-py's float32 values, rounded by torch to `dtype`."""
    rows_bytes = blocks.numpy().reshape(int(np.prod(shape[:-1])), -1)
    values = gguf.quants.dequantize(rows_bytes, qtype(encoding))
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype).view(shape)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    got_bits, want_bits = got.view(BITS[got.dtype]), want.view(BITS[want.dtype])
    if not torch.equal(got_bits, want_bits):
        where = torch.nonzero(got_bits != want_bits)[0].tolist()
        raise AssertionError(f"first difference at {where}: {got[tuple(where)]} != {want[tuple(where)]}")


def test_a_chunk_starts_on_a_block_boundary():
    assert set(GGUF_ENCODINGS) == {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k",
                                   "iq4_nl"}
    for encoding, block in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[qtype(encoding)] == (block.block_elems, block.type_size)
        assert CHUNK % block.block_elems == 0


# (rows, blocks per row): a partial last chunk, a 3-D tensor, and more programs than one
SHAPES_32 = ((23, 96), (2, 3, 64), (48, 1024))
SHAPES_256 = ((3, 768), (2, 2, 256), (20, 2560))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_random_blocks_bit_exact(encoding, dtype):
    shapes = SHAPES_256 if BLOCK_TYPES[encoding].block_elems == 256 else SHAPES_32
    for seed, shape in enumerate(shapes):
        assert np.prod(shape) <= 100 * CHUNK  # keep the interpreter to ~100 programs
        blocks = random_blocks(encoding, int(np.prod(shape[:-1])), shape[-1], seed)
        got = dequantize_gguf(gguf_tensor(blocks, encoding, shape, dtype))
        assert_bits_equal(got, oracle(blocks, encoding, shape, dtype))


@pytest.mark.parametrize("encoding", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_gguf_py_quantized_weights_bit_exact(encoding):
    weight = np.random.default_rng(7).standard_normal((6, 320)).astype(np.float32)
    blocks = torch.from_numpy(gguf.quants.quantize(weight, qtype(encoding)).reshape(-1))
    for dtype in DTYPES:
        got = dequantize_gguf(gguf_tensor(blocks, encoding, (6, 320), dtype))
        assert_bits_equal(got, oracle(blocks, encoding, (6, 320), dtype))
    # the float32 decode is close to the weight it came from: the kernel reads the right codes
    decoded = dequantize_gguf(gguf_tensor(blocks, encoding, (6, 320), torch.float32))
    assert (decoded - torch.from_numpy(weight)).abs().max() < 0.5


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_format_quantized_weights_bit_exact(encoding):
    """Blocks as llama.cpp's quantizers write them (the format's encode), every type."""
    weight = torch.from_numpy(np.random.default_rng(11).standard_normal((3, 512)).astype(np.float32))
    for dtype in DTYPES:
        enc = encode(weight.to(dtype), encoding=encoding, layout="dense")
        assert_bits_equal(dequantize_gguf(enc), oracle(enc.values, encoding, (3, 512), dtype))


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_reference_is_the_oracle(encoding):
    shape = (2, 2 * BLOCK_TYPES[encoding].block_elems)
    blocks = random_blocks(encoding, 2, shape[1], seed=3)
    for dtype in DTYPES:
        assert_bits_equal(dequantize_gguf_reference(gguf_tensor(blocks, encoding, shape, dtype)),
                          oracle(blocks, encoding, shape, dtype))


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_any_bytes_decode_without_crashing(encoding):
    """Non-finite scales (all bytes 0xFF, then random) give what gguf-py gives, NaN for NaN."""
    shape = (2, BLOCK_TYPES[encoding].block_elems)
    nbytes = 2 * BLOCK_TYPES[encoding].type_size
    for blocks in (torch.full((nbytes,), 0xFF, dtype=torch.uint8),
                   torch.from_numpy(np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8))):
        for dtype in DTYPES:
            got = dequantize_gguf(gguf_tensor(blocks, encoding, shape, dtype))
            torch.testing.assert_close(got, oracle(blocks, encoding, shape, dtype), rtol=0, atol=0, equal_nan=True)


def test_writes_into_the_given_buffer():
    blocks = random_blocks("q4_1", 4, 64, seed=1)
    out = torch.full((4, 64), 7.0, dtype=torch.bfloat16)
    assert dequantize_gguf(gguf_tensor(blocks, "q4_1", (4, 64), torch.bfloat16), out) is out
    assert_bits_equal(out, oracle(blocks, "q4_1", (4, 64), torch.bfloat16))


def test_empty_tensor():
    empty = torch.empty(0, dtype=torch.uint8)
    assert dequantize_gguf(gguf_tensor(empty, "q6_k", (0, 256), torch.float32)).shape == (0, 256)


def test_bad_inputs_are_format_errors():
    blocks = random_blocks("q8_0", 2, 64, seed=0)  # 2 rows x 2 blocks x 34 bytes

    def tensor(values=blocks, encoding="q8_0", shape=(2, 64), dtype=torch.float16, layout="dense"):
        return EncodedTensor(shape, dtype, layout, int(np.prod(shape)), values=values, values_encoding=encoding,
                             group_size=0)

    with pytest.raises(FormatError, match="iq2_xs"):
        dequantize_gguf(tensor(encoding="iq2_xs"))
    with pytest.raises(FormatError, match="whole blocks of 32 weights; cols = 48"):
        dequantize_gguf(tensor(shape=(2, 48)))
    with pytest.raises(FormatError, match="should be 136 x torch.uint8, got 135"):
        dequantize_gguf(tensor(values=blocks[:-1]))
    with pytest.raises(FormatError, match="uint8"):
        dequantize_gguf(tensor(values=blocks.view(torch.int8)))
    with pytest.raises(FormatError, match="even address"):
        dequantize_gguf(tensor(values=torch.empty(137, dtype=torch.uint8)[1:]))
    with pytest.raises(FormatError, match="need"):
        dequantize_gguf(tensor(), torch.empty(2, 64))
    with pytest.raises(FormatError, match="contiguous"):
        dequantize_gguf(tensor(), torch.empty(64, 2, dtype=torch.float16).t())
    with pytest.raises(FormatError, match="layout 'dense' only"):
        dequantize_gguf(tensor(layout="bitmap"))
    with pytest.raises(FormatError, match="decodes GGUF block tensors"):
        dequantize_gguf(encode(torch.randn(2, 64), encoding="int8", layout="dense"))


def test_decompress_routes_gguf_tensors_here():
    blocks = random_blocks("q5_k", 2, 512, seed=9)
    enc = gguf_tensor(blocks, "q5_k", (2, 512), torch.bfloat16)
    want = oracle(blocks, "q5_k", (2, 512), torch.bfloat16)
    assert_bits_equal(decompress(enc), want)
    assert_bits_equal(decompress_reference(enc), want)
