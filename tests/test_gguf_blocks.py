"""GGUF block encodings: the torch reference against gguf-py (decode, and quantize where gguf-py has
it), against llama.cpp's own reference quantizers where a built libggml is at hand, against the
spec on hand-built blocks, and through the store."""

import ctypes
import glob
import math
import os
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from endor_ray.errors import FormatError
from endor_ray.format import (
    BLOCK_TYPES, GGUF_ENCODINGS, decode, dequantize_blocks, encode, encoded_nbytes, gguf_tensor, quantize_blocks,
)
from endor_ray.format.cpu_decode import decode_into
from endor_ray.store.store import tensors_from_buffer, write_tensor_file

QTYPES = {name: getattr(gguf.GGMLQuantizationType, name.upper()) for name in GGUF_ENCODINGS}
F16_OFFSETS = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q4_k": [0, 2],
               "q5_k": [0, 2], "q6_k": [208], "q3_k": [108], "q2_k": [80, 82], "iq4_nl": [0]}  # each block's f16 scales
RTN_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the types gguf-py quantizes
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_blocks(encoding: str, num_blocks: int, seed: int, finite: bool = True) -> np.ndarray:
    """[num_blocks, type_size] uint8 of random bytes; with `finite`, every f16 scale finite."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (num_blocks, BLOCK_TYPES[encoding].type_size), dtype=np.uint8)
    if finite:
        for offset in F16_OFFSETS[encoding]:
            half = data[:, offset:offset + 2].copy().view(np.float16)
            half[~np.isfinite(half)] = np.float16(rng.standard_normal())
            data[:, offset:offset + 2] = half.view(np.uint8)
    return data


def gguf_py_decode(data: np.ndarray, encoding: str, rows: int) -> np.ndarray:
    return gguf.quants.dequantize(data.reshape(rows, -1), QTYPES[encoding])


def test_block_geometry_is_ggml_s():
    for name, block in BLOCK_TYPES.items():
        assert (block.block_elems, block.type_size) == gguf.GGML_QUANT_SIZES[QTYPES[name]], name


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 5), blocks_per_row=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_decode_is_bit_identical_to_gguf_py(encoding, rows, blocks_per_row, seed):
    cols = blocks_per_row * BLOCK_TYPES[encoding].block_elems
    data = random_blocks(encoding, rows * blocks_per_row, seed)
    ours = dequantize_blocks(torch.from_numpy(data.reshape(-1)), encoding, rows, cols)
    expected = gguf_py_decode(data, encoding, rows)
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert np.array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_non_finite_scales_decode_without_failing(encoding):
    data = random_blocks(encoding, 64, seed=5, finite=False)
    for offset in F16_OFFSETS[encoding]:
        for start, value in enumerate([np.inf, -np.inf, np.nan]):
            data[start::4, offset:offset + 2] = np.array([value], np.float16).view(np.uint8)
    ours = dequantize_blocks(torch.from_numpy(data.reshape(-1)), encoding, 4, 16 * BLOCK_TYPES[encoding].block_elems)
    expected = gguf_py_decode(data, encoding, 4)
    assert np.array_equal(np.isnan(ours.numpy()), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert np.array_equal(ours.numpy()[finite], expected[finite])


def f16(value: float) -> bytes:
    return struct.pack("<e", value)


def test_hand_built_32_element_blocks():
    nibbles = bytes(j | ((15 - j) << 4) for j in range(16))  # element j: j, element 16 + j: 15 - j
    low, high = np.arange(16.0), 15 - np.arange(16.0)
    cases = {
        "q8_0": (f16(0.25) + np.arange(-16, 16, dtype=np.int8).tobytes(),
                 np.arange(-16, 16) * 0.25),
        "q4_0": (f16(0.5) + nibbles, np.concatenate([low, high]) * 0.5 - 4),
        "q4_1": (f16(1.0) + f16(-2.0) + nibbles, np.concatenate([low, high]) - 2),
        # fifth bits: qh = 0x80000001 sets elements 0 and 31
        "q5_0": (f16(2.0) + struct.pack("<I", 0x80000001) + nibbles,
                 (np.concatenate([low, high]) + 16 * np.isin(np.arange(32), [0, 31]) - 16) * 2),
        "q5_1": (f16(1.0) + f16(0.5) + struct.pack("<I", 0x00010000) + nibbles,
                 np.concatenate([low, high]) + 16 * (np.arange(32) == 16) + 0.5),
    }
    for encoding, (block, expected) in cases.items():
        assert len(block) == BLOCK_TYPES[encoding].type_size, encoding
        out = dequantize_blocks(torch.frombuffer(bytearray(block), dtype=torch.uint8), encoding, 1, 32)
        assert torch.equal(out, torch.tensor(expected, dtype=torch.float32).view(1, 32)), encoding


def k_scale_bytes(sc: list[int], mn: list[int]) -> bytes:
    """The spec's 12 scale bytes for 8 six-bit scales and minimums."""
    out = [0] * 12
    for s in range(8):
        if s < 4:
            out[s] |= sc[s]
            out[s + 4] |= mn[s]
        else:
            out[s + 4] = (sc[s] & 15) | ((mn[s] & 15) << 4)
            out[s - 4] |= (sc[s] >> 4) << 6
            out[s] |= (mn[s] >> 4) << 6
    return bytes(out)


def test_hand_built_k_blocks():
    rng = np.random.default_rng(3)
    sc, mn = [1, 2, 3, 63, 17, 33, 48, 5], [0, 7, 63, 1, 40, 2, 16, 31]
    codes = rng.integers(0, 32, 256)  # element e = 32 s + l
    qs = bytearray(128)
    qh = bytearray(32)
    for e, code in enumerate(codes):
        s, l = divmod(e, 32)
        qs[32 * (s // 2) + l] |= (int(code) & 15) << (4 * (s % 2))
        qh[l] |= (int(code) >> 4) << s
    d, dmin = 0.125, 0.0625
    scale = np.float32(d) * np.array(sc, np.float32)
    minimum = np.float32(dmin) * np.array(mn, np.float32)
    for encoding in ("q4_k", "q5_k"):
        q = codes % 16 if encoding == "q4_k" else codes
        block = f16(d) + f16(dmin) + k_scale_bytes(sc, mn) + (bytes(qh) if encoding == "q5_k" else b"") + bytes(qs)
        expected = np.repeat(scale, 32) * q.astype(np.float32) - np.repeat(minimum, 32)
        out = dequantize_blocks(torch.frombuffer(bytearray(block), dtype=torch.uint8), encoding, 1, 256)
        assert np.array_equal(out.numpy()[0], expected.astype(np.float32)), encoding

    codes6 = rng.integers(0, 64, 256)  # element e = 128 h + 32 k + l
    ql, qh6 = bytearray(128), bytearray(64)
    for e, code in enumerate(codes6):
        h, rest = divmod(e, 128)
        k, l = divmod(rest, 32)
        ql[64 * h + 32 * (k % 2) + l] |= (int(code) & 15) << (4 * (k // 2))
        qh6[32 * h + l] |= (int(code) >> 4) << (2 * k)
    scales6 = rng.integers(-128, 128, 16).astype(np.int8)
    block = bytes(ql) + bytes(qh6) + scales6.tobytes() + f16(0.5)
    expected = np.repeat(np.float32(0.5) * scales6.astype(np.float32), 16) * (codes6 - 32).astype(np.float32)
    out = dequantize_blocks(torch.frombuffer(bytearray(block), dtype=torch.uint8), "q6_k", 1, 256)
    assert np.array_equal(out.numpy()[0], expected)


def test_hand_built_low_bit_blocks():
    """q3_k, q2_k and iq4_nl from the spec's element formulas, block bytes written by hand."""
    rng = np.random.default_rng(8)
    codes = rng.integers(0, 8, 256)  # q3_k: low 2 bits | high bit << 2, element e = 128 h + 32 k + l
    qs, hmask = bytearray(64), bytearray(32)
    for e, code in enumerate(codes):
        h, rest = divmod(e, 128)
        k, l = divmod(rest, 32)
        qs[32 * h + l] |= (int(code) & 3) << (2 * k)
        hmask[e % 32] |= (int(code) >> 2) << (e // 32)
    sc = rng.integers(0, 64, 16)  # 6-bit, stored + 32
    scales = bytearray(12)
    for s, value in enumerate(sc):
        scales[s % 8] |= (int(value) & 15) << (4 * (s // 8))
        scales[8 + s % 4] |= (int(value) >> 4) << (2 * (s // 4))
    block = bytes(hmask) + bytes(qs) + bytes(scales) + f16(0.25)
    q = (codes & 3) - 4 * (1 - (codes >> 2))
    expected = np.repeat(np.float32(0.25) * (sc - 32).astype(np.float32), 16) * q.astype(np.float32)
    out = dequantize_blocks(torch.frombuffer(bytearray(block), dtype=torch.uint8), "q3_k", 1, 256)
    assert np.array_equal(out.numpy()[0], expected)

    codes2 = rng.integers(0, 4, 256)
    qs2 = bytearray(64)
    for e, code in enumerate(codes2):
        h, rest = divmod(e, 128)
        k, l = divmod(rest, 32)
        qs2[32 * h + l] |= int(code) << (2 * k)
    sc2, mn2 = rng.integers(0, 16, 16), rng.integers(0, 16, 16)
    block = bytes((sc2 | (mn2 << 4)).astype(np.uint8)) + bytes(qs2) + f16(0.5) + f16(0.125)
    expected = (np.repeat(np.float32(0.5) * sc2.astype(np.float32), 16) * codes2.astype(np.float32)
                - np.repeat(np.float32(0.125) * mn2.astype(np.float32), 16))
    out = dequantize_blocks(torch.frombuffer(bytearray(block), dtype=torch.uint8), "q2_k", 1, 256)
    assert np.array_equal(out.numpy()[0], expected)

    book = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]  # kvalues_iq4nl
    nibbles = bytes(j | ((15 - j) << 4) for j in range(16))  # element j: level j, element 16 + j: 15 - j
    out = dequantize_blocks(torch.frombuffer(bytearray(f16(-0.5) + nibbles), dtype=torch.uint8), "iq4_nl", 1, 32)
    assert np.array_equal(out.numpy()[0], np.float32(-0.5) * np.array(book + book[::-1], np.float32))


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Normal weights at mixed magnitudes with exact zeros: ties, tiny and empty blocks."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.0, 1e-3, 1.0, 30.0], (rows, cols), p=[0.1, 0.2, 0.6, 0.1])
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


@pytest.mark.parametrize("encoding", RTN_TYPES)
@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 6), blocks_per_row=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_quantize_equals_gguf_py(encoding, rows, blocks_per_row, seed):
    w = weights(rows, blocks_per_row * 32, seed)
    w[w == 0] = 0.0  # gguf-py picks a -0.0 as a block's extreme where llama.cpp keeps +0.0 (tested below)
    ours = quantize_blocks(torch.from_numpy(w), encoding)
    assert np.array_equal(ours.numpy(), gguf.quants.quantize(w, QTYPES[encoding]).reshape(-1))


def _libggml() -> ctypes.CDLL | None:
    """A built libggml-base (the benchmark's llama.cpp build), or None: those tests are skipped."""
    found = sorted(glob.glob(os.path.expanduser(
        "~/.cache/endor-ray/llamacpp/*/vendor/llama.cpp/build/bin/libggml-base.so")))
    return ctypes.CDLL(found[-1]) if found else None


def _ggml_function(lib: ctypes.CDLL, encoding: str, reference: bool) -> ctypes._CFuncPtr:
    """libggml's quantize_row_<type>_ref (src, dst, k), or quantize_<type> (src, dst, nrow, n_per_row,
    quant_weights); iq4_nl's reference is quantize_iq4_nl without weights (what llama-quantize writes:
    its _ref row function takes no search)."""
    name = encoding[:-1] + "K" if encoding.endswith("_k") else encoding
    if reference and encoding != "iq4_nl":
        function = getattr(lib, f"quantize_row_{name}_ref")
        function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        return function
    function = getattr(lib, f"quantize_{name}")
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    function.restype = ctypes.c_size_t
    if not reference:
        return function
    return lambda src, dst, numel: function(src, dst, 1, numel, None)


@pytest.mark.skipif(_libggml() is None, reason="no built llama.cpp (libggml-base.so) under ~/.cache/endor-ray")
@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_quantize_equals_llama_cpp_reference(encoding):
    quantize_row = _ggml_function(_libggml(), encoding, reference=True)
    for seed in range(3):
        w = weights(8, 1024, seed)
        w[0, :64] = -0.0  # all-zero blocks of either sign
        w[1, :32] = 0.0
        expected = np.zeros(w.size // BLOCK_TYPES[encoding].block_elems * BLOCK_TYPES[encoding].type_size, np.uint8)
        quantize_row(w.ctypes.data, expected.ctypes.data, w.size)
        assert np.array_equal(quantize_blocks(torch.from_numpy(w), encoding).numpy(), expected), (encoding, seed)


@pytest.mark.skipif(_libggml() is None, reason="no built llama.cpp (libggml-base.so) under ~/.cache/endor-ray")
@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_importance_quantize_equals_llama_cpp(encoding):
    """With an importance matrix: llama.cpp's quantize_<type>(src, dst, nrow, n_per_row, quant_weights)."""
    quantize = _ggml_function(_libggml(), encoding, reference=False)
    rng = np.random.default_rng(4)
    for seed in range(2):
        w = weights(8, 512, seed)
        importance = (rng.exponential(1.0, 512) * (rng.random(512) > 0.05)).astype(np.float32)  # some zeros
        expected = np.zeros(w.size // BLOCK_TYPES[encoding].block_elems * BLOCK_TYPES[encoding].type_size, np.uint8)
        quantize(w.ctypes.data, expected.ctypes.data, 8, 512, importance.ctypes.data)
        ours = quantize_blocks(torch.from_numpy(w), encoding, torch.from_numpy(importance))
        assert np.array_equal(ours.numpy(), expected), (encoding, seed)


def test_importance_lowers_the_weighted_error():
    """Columns that matter more are kept closer (what the importance matrix is for)."""
    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.standard_normal((64, 512)).astype(np.float32))
    importance = torch.from_numpy(rng.exponential(1.0, 512).astype(np.float32) ** 3)
    for encoding in ("q4_0", "q4_1", "q4_k", "q6_k"):
        errors = []
        for given in (None, importance):
            back = dequantize_blocks(quantize_blocks(w, encoding, given), encoding, 64, 512)
            errors.append(float((((back - w) ** 2) * importance).sum()))
        assert errors[1] < errors[0], encoding
    with pytest.raises(FormatError, match="512 finite, non-negative"):
        quantize_blocks(w, "q4_0", -importance)


def test_importance_lowers_the_weighted_error_of_the_low_bit_types():
    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.standard_normal((64, 512)).astype(np.float32))
    importance = torch.from_numpy(rng.exponential(1.0, 512).astype(np.float32) ** 3)
    for encoding in ("q3_k", "q2_k", "iq4_nl"):
        errors = []
        for given in (None, importance):
            back = dequantize_blocks(quantize_blocks(w, encoding, given), encoding, 64, 512)
            errors.append(float((((back - w) ** 2) * importance).sum()))
        assert errors[1] < 0.6 * errors[0], encoding  # measured: 0.45 (q3_k), 0.26 (q2_k), 0.50 (iq4_nl)


def test_all_zero_blocks_follow_llama_cpp():
    """C starts the block's extreme at +0.0, so a block of zeros of either sign has d = 0.0 / -8 = -0.0."""
    w = torch.zeros(2, 32)
    w[1] = -0.0
    blocks = quantize_blocks(w, "q4_0").view(2, 18)
    assert blocks[:, :2].contiguous().view(torch.float16).view(torch.int16).tolist() == [[-32768], [-32768]]
    assert (blocks[:, 2:] == 0x88).all()  # every code 8: zero


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_quantize_follows_the_rounding_rule(encoding):
    """Every code is the nearest level of its block's stored scale (float64 check), up to exact ties,
    and llama.cpp's sub-blocks whose scale rounds to zero."""
    w = weights(4, 512, seed=11)
    blocks = quantize_blocks(torch.from_numpy(w), encoding)
    decoded = dequantize_blocks(blocks, encoding, 4, 512).double().numpy()
    block = BLOCK_TYPES[encoding]
    x = w.astype(np.float64).reshape(-1, block.block_elems)
    back = decoded.reshape(x.shape)
    if encoding in RTN_TYPES:  # the nearest of the block's levels, as the stored f16 scale (and min) give them
        raw = blocks.numpy().reshape(-1, block.type_size)
        d = raw[:, :2].copy().view(np.float16).astype(np.float64)
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float64) if encoding in ("q4_1", "q5_1") else 0 * d
        codes = {"q8_0": np.arange(-127, 128), "q4_0": np.arange(-8, 8), "q5_0": np.arange(-16, 16),
                 "q4_1": np.arange(16), "q5_1": np.arange(32)}[encoding]
        levels = d * codes + m  # [num_blocks, num_codes]
        nearest = np.abs(x[:, :, None] - levels[:, None, :]).min(axis=2)
        # codes are chosen with the unrounded scale and minimum: their f16 rounding moves each level
        # by at most |code| * |d| * 2^-11 + |m| * 2^-11
        slack = (np.abs(codes).max() * np.abs(d) + np.abs(m)) * 2.0 ** -10 + 1e-12
        assert (np.abs(back - x) <= nearest + slack).all()
    else:  # k-types and iq4_nl: within one step of the sub-block's scale (q2_k: 4 levels)
        error = np.abs(back - x).max(axis=1)
        steps = {"q4_k": 7, "q3_k": 7, "q2_k": 3, "iq4_nl": 7}.get(encoding, 15)
        assert (error <= np.abs(x).max(axis=1) / steps + 1e-6).all()
    rmse = np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())
    measured = {"q8_0": 0.0084, "q4_0": 0.082, "q4_1": 0.117, "q5_0": 0.058, "q5_1": 0.054, "q4_k": 0.075,
                "q5_k": 0.047, "q6_k": 0.025, "q3_k": 0.092, "q2_k": 0.33, "iq4_nl": 0.081}  # relative RMSE on
    # these weights when written
    assert rmse < 1.4 * measured[encoding]


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
def test_non_finite_weights_quantize_as_zero(encoding):
    w = torch.from_numpy(weights(2, 256, seed=2))
    cleaned = w.clone()
    w[0, 3], w[0, 40], w[1, 100] = float("nan"), float("inf"), float("-inf")
    cleaned[0, 3] = cleaned[0, 40] = cleaned[1, 100] = 0.0
    assert torch.equal(quantize_blocks(w, encoding), quantize_blocks(cleaned, encoding))


@pytest.mark.parametrize("encoding", GGUF_ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_store_decode_round_trip(encoding, dtype, tmp_path):
    cols = 2 * BLOCK_TYPES[encoding].block_elems
    weight = torch.from_numpy(weights(3 * 2, cols, seed=7)).view(3, 2, cols).to(dtype)  # 3-D: rows = 6
    enc = encode(weight, encoding=encoding, layout="dense")
    assert enc.gguf and enc.quantized and enc.parts().keys() == {"values"} and enc.nnz == weight.numel()
    assert enc.nbytes == encoded_nbytes(tuple(weight.shape), dtype.itemsize, "dense", weight.numel(), encoding)
    assert enc.nbytes == 6 * cols // BLOCK_TYPES[encoding].block_elems * BLOCK_TYPES[encoding].type_size
    # the blocks are llama.cpp's quantization of the float32 weights, whatever the dtype
    assert torch.equal(enc.values, quantize_blocks(weight.float().reshape(6, cols), encoding))
    expected = torch.from_numpy(gguf_py_decode(enc.values.numpy(), encoding, 6).copy()).to(dtype).view(weight.shape)
    decoded = decode(enc)
    assert decoded.dtype == dtype and torch.equal(decoded.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))
    into = torch.empty_like(decoded)
    decode_into(enc, into, threads=2)
    assert torch.equal(into.view(torch.uint8), decoded.view(torch.uint8))

    entry = write_tensor_file(tmp_path / "t.safetensors", {"w": enc}, "t.safetensors", layer_idx=0)
    assert "group_size" not in entry["tensors"][0] and list(entry["tensors"][0]["parts"]) == ["values"]
    buffer = torch.from_numpy(np.fromfile(tmp_path / "t.safetensors", dtype=np.uint8))
    read = tensors_from_buffer(buffer, entry)["w"]
    assert read.values_encoding == encoding and torch.equal(read.values, enc.values)
    assert torch.equal(decode(read).view(torch.uint8), decoded.view(torch.uint8))
    buffer[entry["tensors"][0]["parts"]["values"][0] + 5] ^= 1  # a flipped bit in the blocks is caught
    with pytest.raises(Exception, match="checksum"):
        tensors_from_buffer(buffer, entry)


def test_gguf_tensor_wraps_bytes_and_checks_sizes():
    data = torch.from_numpy(random_blocks("q4_1", 8, seed=1).reshape(-1))
    enc = gguf_tensor(data, "q4_1", (2, 128), torch.float16)
    assert torch.equal(decode(enc), dequantize_blocks(data, "q4_1", 2, 128).to(torch.float16))
    with pytest.raises(FormatError, match="160 x torch.uint8"):
        gguf_tensor(data[:-1], "q4_1", (2, 128), torch.float16)
    with pytest.raises(FormatError, match="uint8"):
        gguf_tensor(data.view(torch.int8), "q4_1", (2, 128), torch.float16)


def test_refusals_say_what_to_change():
    with pytest.raises(FormatError, match=r"q4_k.*cols = 96 is not a multiple of 256"):
        encode(torch.randn(2, 96), encoding="q4_k")
    with pytest.raises(FormatError, match="layout 'dense' only"):
        encode(torch.randn(2, 64), encoding="q8_0", layout="bitmap")
    with pytest.raises(FormatError, match="neither mask nor scales"):
        encode(torch.randn(2, 64), encoding="q8_0", mask=torch.ones(128, dtype=torch.bool))
    with pytest.raises(FormatError, match="layout 'dense' only"):
        encoded_nbytes((2, 64), 2, "bitmap", 64, "q4_0")
    data = torch.from_numpy(random_blocks("q8_0", 2, seed=0).reshape(-1))
    enc = gguf_tensor(data, "q8_0", (1, 64), torch.float32)
    from dataclasses import replace
    with pytest.raises(FormatError, match="nnz = numel"):
        decode(replace(enc, nnz=3))
    with pytest.raises(FormatError, match="blocks alone"):
        decode(replace(enc, scales=torch.ones(2)))


def test_reference_decode_is_fast():
    """A SmolLM2-135M MLP weight (576 x 1536) decodes in well under a second (vectorised, no
    per-block Python); the bound is loose because the test machine is shared."""
    data = torch.from_numpy(random_blocks("q4_k", 576 * 1536 // 256, seed=0).reshape(-1))
    dequantize_blocks(data, "q4_k", 576, 1536)
    started = time.perf_counter()
    for encoding in ("q4_k", "q6_k"):
        blocks = torch.from_numpy(random_blocks(encoding, 576 * 1536 // 256, seed=0).reshape(-1))
        dequantize_blocks(blocks, encoding, 576, 1536)
    assert (time.perf_counter() - started) / 2 < 2.0


def test_bytes_per_weight():
    per_weight = {name: block.type_size / block.block_elems for name, block in BLOCK_TYPES.items()}
    assert per_weight["q4_1"] == 0.625 and per_weight["q4_0"] == per_weight["q4_k"] == 0.5625
    assert math.isclose(per_weight["q6_k"], 0.8203125)
    assert per_weight["q3_k"] == 0.4296875 and per_weight["q2_k"] == 0.328125 and per_weight["iq4_nl"] == 0.5625
