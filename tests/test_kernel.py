"""The Triton decoding kernels (through `decompress`) against their torch references and the original, bit for bit.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (conftest): sizes stay small (about 100
programs, well under 1M elements) because the interpreter costs milliseconds per program.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from endor_ray import format as fmt
from endor_ray.errors import FormatError
from endor_ray.kernels.decompress import decompress, decompress_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_sparse(shape, dtype, sparsity, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).to(dtype)
    return weight.masked_fill(torch.rand(shape, generator=generator) < sparsity, 0)


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(fmt.BITS_DTYPES[tensor.dtype]).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("shape,block_size", [((37, 301), 256), ((96, 1000), 1024), ((5000,), 4096)])
def test_kernel_matches_reference_and_original(device, dtype, sparsity, shape, block_size):
    weight = random_sparse(shape, dtype, sparsity)
    flat = weight.view(-1)
    flat[3] = -0.0
    flat[-1] = float("nan")
    enc = fmt.encode(weight, block_size=block_size, layout="bitmap").to(device)
    out = decompress(enc)
    reference = decompress_reference(enc)
    assert torch.equal(as_bits(out), as_bits(weight))
    assert torch.equal(as_bits(reference), as_bits(weight))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_writes_into_given_buffer(device):
    weight = random_sparse((64, 256), torch.float16, 0.6)
    enc = fmt.encode(weight, block_size=256, layout="bitmap").to(device)
    out = torch.full((64, 256), 7.0, dtype=torch.float16, device=device)
    result = decompress(enc, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(as_bits(out), as_bits(weight))


def test_dense_layout_is_copied():
    weight = random_sparse((10, 30), torch.bfloat16, 0.1)
    enc = fmt.encode(weight, layout="dense")
    assert torch.equal(as_bits(decompress(enc)), as_bits(weight))


def test_wrong_output_buffer_is_rejected():
    enc = fmt.encode(random_sparse((16, 32), torch.float16, 0.5), block_size=256, layout="bitmap")
    with pytest.raises(FormatError, match="output buffer"):
        decompress(enc, out=torch.empty(16, 33, dtype=torch.float16))
    with pytest.raises(FormatError, match="output buffer"):
        decompress(enc, out=torch.empty(16, 32, dtype=torch.float32))


def test_reference_handles_all_zero_tensor():
    enc = fmt.encode(torch.zeros(300, dtype=torch.float16), block_size=256, layout="bitmap")
    assert enc.nnz == 0
    assert torch.equal(as_bits(decompress_reference(enc)), as_bits(torch.zeros(300, dtype=torch.float16)))


@pytest.mark.parametrize("device", DEVICES)
def test_a_lying_bitmap_never_reads_past_the_blocks_values(device):
    """Every bit set but the offsets give each block 3 values: the kernel must stay inside them
    (under the interpreter a read out of bounds is a segfault)."""
    weight = random_sparse((4, 256), torch.float16, 0.5)
    enc = fmt.encode(weight, block_size=256, layout="bitmap")
    lying = fmt.EncodedTensor(enc.shape, enc.dtype, "bitmap", nnz=12, values=torch.arange(1, 13, dtype=torch.int16).view(torch.float16),
                              bitmap=torch.full_like(enc.bitmap, 0xFF), block_offsets=torch.arange(0, 13, 3),
                              block_size=256).to(device)
    out = decompress(lying).cpu().view(torch.int16).view(4, 256)
    for block in range(4):
        assert out[block, :3].tolist() == [3 * block + 1, 3 * block + 2, 3 * block + 3]
        assert not out[block, 3:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("encoding", ["int8", "int4"])
@pytest.mark.parametrize("layout,sparsity", [("bitmap", 0.5), ("bitmap", 0.9), ("dense", 0.0)])
def test_quantized_kernel_matches_the_reference_decode(device, dtype, encoding, layout, sparsity):
    """Dequantizing in the kernel gives the torch reference's values bit for bit: ragged groups
    (301 columns, groups of 13), an odd number of int4 codes, blocks starting at odd codes, NaN."""
    weight = random_sparse((37, 301), dtype, sparsity, seed=3)
    weight.view(-1)[5] = float("nan")
    weight.view(-1)[7] = -0.0
    enc = fmt.encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=13)
    assert enc.layout == layout and enc.quantized
    reference = fmt.decode(enc)
    assert torch.equal(as_bits(decompress(enc.to(device))), as_bits(reference))
    assert torch.equal(as_bits(decompress_reference(enc)), as_bits(reference))


def test_quantized_kernel_never_reads_outside_the_scales():
    """Row offsets that lie (a damaged tensor) give wrong values, not reads past the arrays."""
    import dataclasses

    enc = fmt.encode(random_sparse((8, 256), torch.float16, 0.5), block_size=256, encoding="int4", group_size=4)
    lying = dataclasses.replace(enc, row_offsets=torch.full_like(enc.row_offsets, -10_000))
    out = decompress(lying)  # group indices far past the scales: masked to scale 0
    assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(1,), (7, 33), (3, 200), (2, 2, 70)]),
    sparsity=st.floats(min_value=0.0, max_value=1.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    encoding=st.sampled_from(["int8", "int4"]),
    layout=st.sampled_from(["bitmap", "dense"]),
    group_size=st.sampled_from([1, 3, 16, 128]),
    seed=st.integers(0, 2**16),
)
def test_quantized_kernel_property(shape, sparsity, dtype, encoding, layout, group_size, seed):
    """Any shape, sparsity, group size (ragged groups) and layout: the kernel equals the reference."""
    weight = random_sparse(shape, dtype, sparsity, seed)
    if weight.numel() > 2:
        weight.view(-1)[0], weight.view(-1)[-1] = float("nan"), -0.0
    enc = fmt.encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=group_size)
    assert torch.equal(as_bits(decompress(enc)), as_bits(fmt.decode(enc)))
