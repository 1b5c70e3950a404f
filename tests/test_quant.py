"""Quantized values (INT8 / INT4 with group scales) against the spec in endor_ray.format.quant."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from endor_ray import format as fmt
from endor_ray.errors import FormatError
from endor_ray.format import quant

from test_format import DTYPES, bits_equal, random_sparse

ENCODINGS = ["int8", "int4"]


def kept_groups(weight: torch.Tensor, group_size: int):
    """(row, [kept flat positions]) of every group, straight from the spec's words."""
    rows, cols = quant.rows_cols(tuple(weight.shape))
    mask = fmt.tensor.nonzero_mask(weight).view(rows, cols)
    for row in range(rows):
        kept = torch.nonzero(mask[row]).view(-1) + row * cols
        for start in range(0, kept.numel(), group_size):
            yield row, kept[start : start + group_size]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_group_is_quantized_symmetrically_to_its_own_scale(encoding, dtype):
    weight = random_sparse((9, 100), dtype, 0.5, seed=1)
    enc = fmt.encode(weight, block_size=256, layout="bitmap", encoding=encoding, group_size=7)
    decoded = fmt.decode(enc).view(-1)
    qmax = quant.QUANTIZED_ENCODINGS[encoding]
    flat = weight.view(-1).float()
    for row, positions in kept_groups(weight, 7):
        amax = flat[positions].abs().max()
        scale = (amax / qmax).to(dtype).float()
        codes = torch.clamp(torch.round(flat[positions] / scale), -qmax, qmax)
        assert torch.equal(decoded[positions].float(), (codes * scale).to(dtype).float())
        assert (decoded[positions].float() - flat[positions]).abs().max() <= scale / 2 + torch.finfo(dtype).eps * amax  # + the output's rounding
    assert (decoded[fmt.tensor.nonzero_mask(weight) == 0] == 0).all()


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    weight = torch.tensor([[7.0, -7.0, 1.0, -1.0, 3.0]], dtype=torch.float16)
    enc = fmt.encode(weight, layout="dense", encoding="int4", group_size=128)
    assert enc.scales.tolist() == [1.0]
    assert enc.values.tolist() == [0x97, 0xF1, 0x03]  # (7, -7), (1, -1), (3, pad 0)
    assert fmt.decode(enc).tolist() == weight.tolist()
    assert enc.nbytes == 3 + 2


def test_hand_built_bitmap_example():
    """The worked example of docs/FORMAT.md: two rows, groups of 2 kept elements."""
    weight = torch.tensor([[0, 2.0, -4.0, 0, 1.0], [0, 0, 0, 0, 6.0]], dtype=torch.float16)
    enc = fmt.encode(weight, block_size=256, layout="bitmap", encoding="int8", group_size=2)
    assert enc.row_offsets.tolist() == [0, 3, 4]
    assert enc.groups_per_row == 2  # the longest row has 3 kept elements
    assert enc.scales.tolist() == [torch.tensor(4 / 127, dtype=torch.float16).item(),
                                   torch.tensor(1 / 127, dtype=torch.float16).item(),
                                   torch.tensor(6 / 127, dtype=torch.float16).item(), 0.0]
    assert enc.values.tolist() == [64, -127, 127, 127]
    assert enc.nbytes == 2 + 16 + 24 + 4 * 2 + 4


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_nan_inf_and_negative_zero_in_kept_values(encoding):
    weight = torch.tensor([[1.0, float("nan"), -0.0, float("inf"), -2.0, float("-inf")]], dtype=torch.bfloat16)
    enc = fmt.encode(weight, layout="bitmap", encoding=encoding, group_size=8)
    qmax = quant.QUANTIZED_ENCODINGS[encoding]
    scale = torch.tensor(2.0 / qmax, dtype=torch.bfloat16).float()
    codes = quant.unpack_codes(enc.values, enc.nnz, encoding).tolist()
    assert codes[1] == 0 and codes[2] == 0  # NaN and -0.0 code to 0
    assert codes[3] == qmax and codes[5] == -qmax  # infinities clamp
    assert fmt.decode(enc)[0, 4].item() == (-qmax * scale).to(torch.bfloat16).item()
    assert torch.isfinite(fmt.decode(enc)).all()


def test_given_scales_reproduce_the_dequantized_values():
    """A caller that chose codes and scales (SparseGPT) gets back exactly its values on re-encoding,
    kept zeros included."""
    weight = random_sparse((16, 200), torch.bfloat16, 0.5, seed=2)
    enc = fmt.encode(weight, block_size=256, layout="bitmap", encoding="int4", group_size=16)
    decoded = fmt.decode(enc)
    mask = fmt.tensor.unpack_bits(enc.bitmap, enc.numel)
    again = fmt.encode(decoded, block_size=256, encoding="int4", group_size=16, mask=mask, scales=enc.scales)
    assert again.layout == "bitmap" and torch.equal(again.values, enc.values)
    assert bits_equal(fmt.decode(again), decoded)
    with pytest.raises(FormatError, match="finite"):
        fmt.encode(decoded, encoding="int4", group_size=16, mask=mask, scales=enc.scales * float("inf"))
    with pytest.raises(FormatError, match="scales"):
        fmt.encode(decoded, encoding="int4", group_size=16, mask=mask, scales=enc.scales[:-1])


@settings(max_examples=80, deadline=None)
@given(
    shape=st.sampled_from([(0,), (1,), (5,), (3, 0), (7, 33), (4, 3, 50), (2, 257)]),
    sparsity=st.floats(min_value=0.0, max_value=1.0),
    dtype=st.sampled_from(DTYPES),
    encoding=st.sampled_from(ENCODINGS),
    layout=st.sampled_from([None, "bitmap", "dense"]),
    group_size=st.sampled_from([1, 2, 3, 16, 128, 1000]),
    specials=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(shape, sparsity, dtype, encoding, layout, group_size, specials, seed):
    """Every encoding decodes by the spec; sizes follow the formula; codes re-encode identically."""
    weight = random_sparse(shape, dtype, sparsity, seed)
    if specials and weight.numel() > 2:
        weight.view(-1)[0], weight.view(-1)[-1] = float("nan"), -0.0
    enc = fmt.encode(weight, block_size=256, layout=layout, encoding=encoding, group_size=group_size)
    fmt.validate_contents(enc)
    rows, cols = quant.rows_cols(shape)
    assert enc.nbytes == fmt.encoded_nbytes(shape, dtype.itemsize, enc.layout, enc.nnz, encoding, group_size,
                                            enc.groups_per_row if enc.layout == "bitmap" else None, 256)
    decoded = fmt.decode(enc)
    assert decoded.shape == weight.shape
    kept = fmt.tensor.nonzero_mask(weight) if enc.layout == "bitmap" else torch.ones(weight.numel(), dtype=torch.bool)
    assert (decoded.view(-1)[~kept].view(fmt.BITS_DTYPES[dtype]) == 0).all()
    codes = quant.unpack_codes(enc.values, enc.value_count, encoding)
    assert codes.numel() == 0 or codes.abs().max().item() <= quant.QUANTIZED_ENCODINGS[encoding]
    finite = torch.isfinite(weight.view(-1).float()) & kept
    if finite.any():  # error within half a step of the largest scale
        error = (decoded.view(-1).float() - weight.view(-1).float())[finite].abs().max()
        largest = weight.view(-1).float()[finite].abs().max()
        assert error <= enc.scales.float().max() * 0.5 * 1.01 + torch.finfo(dtype).eps * largest + 1e-6
    again = fmt.encode(decoded, block_size=256, layout=enc.layout, encoding=encoding, group_size=group_size,
                       mask=kept, scales=enc.scales)
    assert torch.equal(again.values, enc.values) and bits_equal(fmt.decode(again), decoded)


def test_validate_rejects_inconsistent_quantized_tensors():
    enc = fmt.encode(random_sparse((10, 300), torch.float16, 0.5), block_size=256, encoding="int4", group_size=32)
    with pytest.raises(FormatError, match="values"):
        fmt.validate(dataclasses.replace(enc, values=enc.values[:-1]))
    with pytest.raises(FormatError, match="row_offsets"):
        fmt.validate(dataclasses.replace(enc, row_offsets=enc.row_offsets[:-1]))
    with pytest.raises(FormatError, match="scales"):
        fmt.validate(dataclasses.replace(enc, scales=enc.scales[:-1]))
    with pytest.raises(FormatError, match="needs scales"):
        fmt.validate(dataclasses.replace(enc, scales=None))
    with pytest.raises(FormatError, match="group size"):
        fmt.validate(dataclasses.replace(enc, group_size=0))
    bad = enc.row_offsets.clone()
    bad[-1] += 1
    with pytest.raises(FormatError, match="row offsets run"):
        fmt.validate_contents(dataclasses.replace(enc, row_offsets=bad))
    raw = fmt.encode(random_sparse((10, 300), torch.float16, 0.5), block_size=256)
    with pytest.raises(FormatError, match="no scales"):
        fmt.validate(dataclasses.replace(raw, scales=enc.scales))


def test_bytes_per_weight_at_half_sparsity():
    """The issue's numbers: bf16 bitmap at 50% sparsity, groups of 128."""
    weight = random_sparse((576, 1536), torch.bfloat16, 0.0)
    pruned = weight.clone()
    pruned[:, ::2] = 0  # exactly half of each row
    per_weight = {name: fmt.encode(pruned, encoding=name).nbytes / pruned.numel() for name in ("raw", "int8", "int4")}
    assert per_weight["raw"] == pytest.approx(1.13, abs=0.01)
    assert per_weight["int8"] == pytest.approx(0.64, abs=0.01)
    assert per_weight["int4"] == pytest.approx(0.39, abs=0.01)
    dense_int4 = fmt.encode(weight, encoding="int4")
    assert dense_int4.layout == "dense" and dense_int4.nbytes / weight.numel() == pytest.approx(0.5 + 2 / 128, abs=1e-3)
    assert math.isclose(fmt.encode(weight, encoding="int8").nbytes / weight.numel(), 1 + 2 / 128, abs_tol=1e-3)
