"""Super-block types over a flattened tensor whose rows do not hold whole super-blocks (SmolLM2's 576
columns): the torch reference, the C decoder (every ISA) and the Triton kernel (TRITON_INTERPRET=1)
all equal gguf-py's `dequantize` applied to the flat run of block bytes, and a weight encoded so
survives the store."""

import gguf
import numpy as np
import pytest
import torch

from endor_ray.errors import FormatError
from endor_ray.format import BLOCK_TYPES, cpu_decode, decode, encode, encoded_nbytes, gguf_tensor
from endor_ray.format.gguf_blocks import blocks_fit, dequantize_blocks
from endor_ray.store.store import tensors_from_buffer, write_tensor_file

from test_format import bits_equal
from test_gguf_cpu_decode import random_blocks

SHAPE = (4, 576)  # 2304 elements: 9 super-blocks, the 3rd spanning rows 0 and 1
ENCODINGS = ("q4_k", "q3_k", "q2_k", "q5_k", "q6_k")


def flat_oracle(blocks: torch.Tensor, encoding: str, shape: tuple[int, int]) -> torch.Tensor:
    """gguf-py's dequantize of the blocks as one row of numel elements, reshaped."""
    qtype = gguf.GGMLQuantizationType[encoding.upper()]
    flat = gguf.quants.dequantize(blocks.numpy().reshape(1, -1), qtype)
    return torch.from_numpy(np.ascontiguousarray(flat)).reshape(shape)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reference_and_c_decode_flat_blocks_as_gguf_py(encoding):
    rows, cols = SHAPE
    blocks = random_blocks(encoding, rows, cols, seed=3)
    assert blocks.numel() == rows * cols // 256 * BLOCK_TYPES[encoding].type_size
    want = flat_oracle(blocks, encoding, SHAPE)
    assert bits_equal(dequantize_blocks(blocks, encoding, rows, cols), want)
    for isa in cpu_decode.supported_gguf_isas():
        for dtype in (torch.float32, torch.bfloat16):
            out = torch.full(SHAPE, 7.0, dtype=dtype)
            cpu_decode.dequantize_gguf_into(blocks, encoding, rows, cols, out, threads=3, isa=isa)
            assert bits_equal(out, want.to(dtype)), (isa, dtype)


@pytest.mark.parametrize("encoding", ("q4_k", "q3_k"))
def test_triton_kernel_decodes_flat_blocks_as_gguf_py(encoding):
    from endor_ray.kernels.gguf_dequant import dequantize_gguf

    blocks = random_blocks(encoding, *SHAPE, seed=4)
    got = dequantize_gguf(gguf_tensor(blocks, encoding, SHAPE, torch.float16))
    assert bits_equal(got, flat_oracle(blocks, encoding, SHAPE).to(torch.float16))


def test_a_576_wide_weight_encodes_stores_and_decodes(tmp_path):
    weight = torch.randn(4, 576, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)) * 0.05
    enc = encode(weight, encoding="q4_k")
    assert enc.nbytes == encoded_nbytes(weight.shape, 2, "dense", weight.numel(), "q4_k") == 4 * 576 // 256 * 144
    assert bits_equal(decode(enc), flat_oracle(enc.values, "q4_k", SHAPE).to(torch.bfloat16))
    err = (decode(enc).float() - weight.float()).abs().max()
    assert err < 0.1 * float(weight.float().abs().max())  # 4-bit codes: a fraction of the range
    entry = write_tensor_file(tmp_path / "t.safetensors", {"w": enc}, "t.safetensors", layer_idx=0)
    buffer = torch.from_numpy(np.fromfile(tmp_path / "t.safetensors", dtype=np.uint8))
    assert bits_equal(decode(tensors_from_buffer(buffer, entry)["w"]), decode(enc))


def test_the_layout_rule():
    assert blocks_fit("q4_k", 576, 576) and blocks_fit("q6_k", 192, 576) and blocks_fit("q2_k", 3, 256)
    assert not blocks_fit("q4_k", 1, 576)  # 576 elements: not whole super-blocks
    assert not blocks_fit("q4_0", 2, 48)  # the 32-element types keep whole rows
    with pytest.raises(FormatError, match="nor is numel = 576"):
        encode(torch.randn(1, 576), encoding="q3_k")
