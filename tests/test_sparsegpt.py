"""SparseGPT: against a textbook sequential-OBS reference in float64, against magnitude / Wanda /
round-to-nearest on correlated inputs, the exact re-encoding of its quantized output, the per-row
counts, and awkward Hessians (dead inputs, singular, indefinite)."""

import pytest
import torch

from endor_ray import format as fmt
from endor_ray.errors import ConfigError
from endor_ray.format.quant import QUANTIZED_ENCODINGS
from endor_ray.compress.prune import prune_weight
from endor_ray.compress.sparsegpt import sparsegpt

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def correlated_inputs(tokens, features, seed, dead=()):
    """[tokens, features] activations driven by a few strong directions (a decaying spectrum, as LLM
    activations have), so the features correlate, and with per-feature scales, so Wanda differs from
    magnitude."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g) * (torch.arange(1, features + 1) ** -0.7)[:, None]
    scale = torch.exp(torch.randn(features, generator=g) * 0.7)
    x = (torch.randn(tokens, features, generator=g) @ mixing) * scale
    x[:, list(dead)] = 0.0
    return x


def output_error(x, weight, approx):
    """||X W^T - X W'^T||_F / ||X W^T||_F."""
    x = x.double()
    return float((x @ (weight.double() - approx.double()).t()).norm() / (x @ weight.double().t()).norm())


# --- an independent reference: column-by-column OBS with an explicit inverse, float64 ---------------------------

def reference(weight, hessian, sparsity, block, damp, encoding="raw", group_size=None, dtype=torch.float32,
              mask=None):
    """Textbook SparseGPT: the inverse Hessian of the free columns is kept explicitly and shrunk by one
    Gaussian elimination step per column (no Cholesky, no lazy batches). Returns (weight, kept mask)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    keep = torch.ones(rows, cols, dtype=torch.bool) if mask is None else mask.clone()
    if mask is None:
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            count = int(i2 * sparsity) - int(i1 * sparsity)
            if count == 0:
                continue
            # OBS saliency of column j once columns < j are fixed: w^2 / [inverse of H over columns j..]_jj
            d = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0].item() for j in range(i1, i2)], dtype=torch.float64)
            # columns before i1 are final already; run the elimination up to i1 on a copy of W
            Wb = _obs(W, Hinv, keep, 0, i1, None, None, None)[0][:, i1:i2]
            score = Wb.square() / d
            order = torch.argsort(score, dim=1, stable=True)[:, :count]
            keep[torch.arange(rows)[:, None], i1 + order] = False
    if encoding == "raw":
        return _obs(W, Hinv, keep, 0, cols, None, None, None)[0], keep
    return _obs(W, Hinv, keep, 0, cols, encoding, group_size, dtype)[0], keep


def _obs(W, Hinv, keep, start, stop, encoding, group_size, dtype):
    W, Hinv = W.clone(), Hinv.clone()
    rows = W.shape[0]
    kept_cols = [torch.nonzero(keep[r]).view(-1).tolist() for r in range(rows)]
    scale = [0.0] * rows
    for j in range(start, stop):
        q = torch.where(keep[:, j], W[:, j], 0.0)
        if encoding is not None:
            qmax = QUANTIZED_ENCODINGS[encoding]
            for r in range(rows):
                if not keep[r, j]:
                    continue
                rank = kept_cols[r].index(j)
                if rank % group_size == 0:  # a group starts: its scale from its members' current values
                    members = kept_cols[r][rank:rank + group_size]
                    amax = W[r, members].abs().max().item()
                    scale[r] = torch.tensor(amax / qmax, dtype=torch.float32).to(dtype).double().item()
                code = 0.0 if scale[r] == 0 else max(-qmax, min(qmax, round(W[r, j].item() / scale[r])))
                q[r] = torch.tensor(code * scale[r], dtype=torch.float32).to(dtype).double()
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = q
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, Hinv


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_matches_sequential_obs_reference(sparsity):
    x = correlated_inputs(256, 48, seed=1, dead=(5, 30))
    weight = torch.randn(12, 48, generator=torch.Generator().manual_seed(2))
    hessian = x.t() @ x
    got = sparsegpt(weight, hessian, sparsity, dtype=torch.float32, block_columns=16)
    want, keep = reference(weight, hessian, sparsity, 16, 0.01)
    assert torch.equal(got.mask, keep)
    assert got.scales is None
    torch.testing.assert_close(got.weight.double(), want, rtol=0, atol=2e-5 * float(want.abs().max()))


@pytest.mark.parametrize("encoding, sparsity", [("int4", 0.5), ("int8", 0.5), ("int4", 0.0)])
def test_joint_quantization_matches_reference(encoding, sparsity):
    """The joint loop (mask fixed, group scales from current values) agrees with the float64 reference
    except where float32 rounding flips a code at a rounding boundary."""
    x = correlated_inputs(256, 40, seed=3, dead=(7,))
    weight = torch.randn(10, 40, generator=torch.Generator().manual_seed(4))
    hessian = x.t() @ x
    got = sparsegpt(weight, hessian, sparsity, encoding, group_size=6, dtype=torch.bfloat16, block_columns=8)
    _, keep = reference(weight, hessian, sparsity, 8, 0.01)
    assert torch.equal(got.mask, keep)
    want, _ = reference(weight, hessian, sparsity, 8, 0.01, encoding, 6, torch.bfloat16, mask=keep)
    same = (got.weight.double() == want).float().mean().item()
    print(f"{encoding} {sparsity}: {same:.3f} identical, errors {output_error(x, weight, got.weight):.4f} "
          f"{output_error(x, weight, want):.4f}")
    assert same > 0.97, same
    assert output_error(x, weight, got.weight) == pytest.approx(output_error(x, weight, want), rel=0.03)


# --- quality against the simple methods ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def problem():
    x = correlated_inputs(2048, 256, seed=5)
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(6)) * 0.02
    return x, weight, x.t() @ x


def test_sparsegpt_beats_magnitude_and_wanda(problem):
    x, weight, hessian = problem
    result = sparsegpt(weight, hessian, 0.5, dtype=torch.float32)
    ours = output_error(x, weight, result.weight)
    magnitude = output_error(x, weight, prune_weight(weight, 0.5, "magnitude"))
    wanda = output_error(x, weight, prune_weight(weight, 0.5, "wanda", hessian.diagonal()))
    print(f"50%: sparsegpt {ours:.4f} wanda {wanda:.4f} magnitude {magnitude:.4f}")
    assert ours < 0.6 * wanda and wanda < 0.7 * magnitude


def test_joint_int4_beats_pruning_then_round_to_nearest(problem):
    x, weight, hessian = problem
    result = sparsegpt(weight, hessian, 0.5, "int4", group_size=32)
    ours = output_error(x, weight, result.weight)

    def round_to_nearest(pruned, mask=None):
        enc = fmt.encode(pruned.to(torch.bfloat16), block_size=256, layout="bitmap", encoding="int4",
                         group_size=32, mask=mask)
        return fmt.decode(enc)

    wanda = output_error(x, weight, round_to_nearest(prune_weight(weight, 0.5, "wanda", hessian.diagonal())))
    raw = sparsegpt(weight, hessian, 0.5, dtype=torch.float32)  # the same mask, quantized afterwards
    after = output_error(x, weight, round_to_nearest(raw.weight, raw.mask.view(-1)))
    print(f"50% int4: joint {ours:.4f} sparsegpt-then-rtn {after:.4f} wanda-then-rtn {wanda:.4f} "
          f"(sparsegpt unquantized {output_error(x, weight, raw.weight):.4f})")
    assert torch.equal(result.mask, raw.mask)
    assert ours < 0.6 * wanda and ours < 0.85 * after


@pytest.mark.parametrize("encoding", ["int4", "int8"])
def test_gptq_beats_round_to_nearest(problem, encoding):
    x, weight, hessian = problem
    result = sparsegpt(weight, hessian, 0.0, encoding, group_size=32)
    assert bool(result.mask.all())
    ours = output_error(x, weight, result.weight)
    rtn = fmt.decode(fmt.encode(weight.to(torch.bfloat16), layout="dense", encoding=encoding, group_size=32))
    theirs = output_error(x, weight, rtn)
    print(f"0% {encoding}: gptq {ours:.4f} rtn {theirs:.4f}")
    assert ours < 0.6 * theirs


# --- the format: the result re-encodes bit for bit -----------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("encoding", ["raw", "int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_round_trip_is_exact(dtype, encoding, sparsity):
    g = torch.Generator().manual_seed(7)
    x = correlated_inputs(128, 72, seed=8, dead=(3,))
    # rows from 1e-7 to 10 in size: fp16 gets subnormal and zero scales, bf16/fp32 tiny ones
    weight = torch.randn(20, 72, generator=g) * torch.logspace(-7, 1, 20)[:, None]
    result = sparsegpt(weight, x.t() @ x, sparsity, encoding, group_size=10, dtype=dtype, block_columns=32)
    assert result.weight.dtype == dtype and result.weight.shape == weight.shape
    assert (result.scales is None) == (encoding == "raw")
    if encoding != "raw":
        assert result.scales.dtype == dtype and result.scales.numel() == 20 * -(-int(result.mask[0].sum()) // 10)
    assert not bool(result.weight[~result.mask].view(torch.uint8).any())  # pruned: +0.0
    enc = fmt.encode(result.weight.to(dtype), block_size=256, layout="bitmap" if sparsity > 0 else None,
                     encoding=encoding, group_size=10, mask=result.mask.view(-1), scales=result.scales)
    decoded = fmt.decode(enc)
    assert torch.equal(decoded.view(torch.uint8), result.weight.view(torch.uint8))
    if encoding == "raw" and sparsity == 0:  # nothing to do but drop the dead input's weights
        expected = weight.clone()
        expected[:, 3] = 0.0
        assert torch.equal(result.weight.view(torch.uint8), expected.to(dtype).view(torch.uint8))


# --- counts and awkward Hessians -----------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.05, 0.3, 0.5, 0.7, 0.9])
def test_every_row_loses_exactly_its_share_in_every_block(sparsity):
    """Guarantee: up to every block end i2, every row has exactly int(i2 * sparsity) pruned weights,
    so int(in * sparsity) in all (the count of endor_ray.compress.prune)."""
    x = correlated_inputs(256, 100, seed=9)
    weight = torch.randn(17, 100, generator=torch.Generator().manual_seed(10))
    result = sparsegpt(weight, x.t() @ x, sparsity, "int8", group_size=16, block_columns=32)
    pruned = (~result.mask).cumsum(dim=1)
    for i2 in (32, 64, 96, 100):
        assert torch.all(pruned[:, i2 - 1] == int(i2 * sparsity))
    assert torch.all(result.weight[~result.mask] == 0)
    assert int(pruned[0, -1]) == int((prune_weight(weight, sparsity, "magnitude") == 0).sum(dim=1)[0])


@pytest.mark.parametrize("encoding", ["raw", "int4"])
def test_dead_inputs(encoding):
    dead = (0, 9, 10, 40)
    x = correlated_inputs(512, 64, seed=11, dead=dead)
    hessian = x.t() @ x
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(12))
    result = sparsegpt(weight, hessian, 0.5, encoding, group_size=8, block_columns=32)
    assert bool(torch.isfinite(result.weight.float()).all())
    assert not bool(result.mask[:, list(dead)].any())  # a weight on a dead input is free to drop: pruned first
    live = [j for j in range(64) if j not in dead]
    alive = sparsegpt(weight[:, live], hessian[live][:, live], 0.5, encoding, group_size=8, block_columns=32)
    assert output_error(x, weight, result.weight) < 1.05 * output_error(x[:, live], weight[:, live], alive.weight)
    kept = sparsegpt(weight, hessian, 0.0, encoding, group_size=8)  # nothing pruned: dead columns kept as 0
    assert torch.all(kept.weight[:, list(dead)] == 0) and bool(kept.mask.all())


def test_singular_hessian_from_duplicate_features(problem):
    x, weight, _ = problem
    x = torch.cat([x[:, :128], x[:, :128]], dim=1)  # every feature twice: H has rank 128 of 256
    hessian = x.t() @ x
    wanda = output_error(x, weight, prune_weight(weight, 0.5, "wanda", hessian.diagonal()))
    errors = {}
    for encoding in ("raw", "int4"):
        result = sparsegpt(weight, hessian, 0.5, encoding, group_size=32)
        assert bool(torch.isfinite(result.weight.float()).all())
        errors[encoding] = output_error(x, weight, result.weight)
    print(f"duplicate features, 50%: sparsegpt {errors['raw']:.4f}, int4 {errors['int4']:.4f}, wanda {wanda:.4f}")
    assert errors["raw"] < 0.5 * wanda and errors["int4"] < 0.6 * wanda  # a dropped weight moves onto its twin


def test_failed_cholesky_raises_the_dampening_then_gives_up(caplog):
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(13))
    rank_one = torch.ones(6, 6)  # exactly singular: the factorization fails without dampening
    retried = sparsegpt(weight, rank_one, 0.5, damp=0.0, dtype=torch.float32)
    assert "dampening" in caplog.text
    direct = sparsegpt(weight, rank_one, 0.5, damp=0.1, dtype=torch.float32)
    assert torch.equal(retried.weight, direct.weight) and torch.equal(retried.mask, direct.mask)
    indefinite = torch.eye(6) + 30 * (torch.ones(6, 6) - torch.eye(6))  # eigenvalue -29: no dampening helps
    with pytest.raises(ConfigError, match="not positive definite.*sum of x x\\^T"):
        sparsegpt(weight, indefinite, 0.5)


def test_bad_arguments():
    weight, hessian = torch.randn(4, 6), torch.eye(6)
    cases = [
        (dict(sparsity=1.0), "sparsity"),
        (dict(hessian=torch.eye(5)), "Hessian must be"),
        (dict(encoding="int2"), "encoding"),
        (dict(encoding="int4", group_size=0), "group size"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(block_columns=0), "block_columns"),
        (dict(damp=-1.0), "damp"),
        (dict(hessian=torch.eye(6) * float("nan")), "NaN"),
        (dict(hessian=-torch.eye(6)), "negative diagonal"),
        (dict(weight=torch.full((4, 6), float("inf"))), "weight has NaN"),
        (dict(weight=torch.randn(2, 4, 6)), "2-D"),
    ]
    for change, message in cases:
        args = dict(weight=weight, hessian=hessian, sparsity=0.5) | change
        with pytest.raises(ConfigError, match=message):
            sparsegpt(**args)
