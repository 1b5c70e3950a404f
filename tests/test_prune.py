"""Pruning: exact per-row counts, kept weights untouched, Wanda's score, the input-norm collector."""

import pytest
import torch
from torch import nn

from endor_ray.errors import ConfigError
from endor_ray.compress.prune import InputNormCollector, magnitude_score, prune_rows, prune_weight, wanda_score


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.6, 0.7, 0.99])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_count_per_row_and_kept_weights_unchanged(sparsity, dtype):
    weight = torch.randn(13, 101, generator=torch.Generator().manual_seed(1)).to(dtype)
    pruned = prune_weight(weight, sparsity, "magnitude")
    num_pruned = int(101 * sparsity)
    zeros_per_row = (pruned == 0).sum(dim=1)
    assert torch.all(zeros_per_row == num_pruned)
    kept = pruned != 0
    assert torch.equal(pruned[kept].view(torch.uint8), weight[kept].view(torch.uint8))


def test_magnitude_drops_the_smallest_of_each_row():
    weight = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.01, 0.02, -3.0, 4.0]])
    pruned = prune_weight(weight, 0.5, "magnitude")
    assert pruned.tolist() == [[0.0, -5.0, 0.0, 2.0], [0.0, 0.0, -3.0, 4.0]]


def test_wanda_weighs_by_input_norm():
    # Equal magnitudes: Wanda keeps the columns whose inputs are large; magnitude cannot tell.
    weight = torch.ones(2, 4)
    input_sq_sum = torch.tensor([1.0, 100.0, 4.0, 0.25])
    pruned = prune_weight(weight, 0.5, "wanda", input_sq_sum)
    assert pruned.tolist() == [[0.0, 1.0, 1.0, 0.0]] * 2
    score = wanda_score(torch.tensor([[3.0, -1.0]]), torch.tensor([1.0, 16.0]))
    assert score.tolist() == [[3.0, 4.0]]


def test_wanda_with_equal_norms_equals_magnitude():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(prune_weight(weight, 0.5, "wanda", torch.full((64,), 3.0)), prune_weight(weight, 0.5, "magnitude"))


def test_ties_broken_stably_by_position():
    pruned = prune_rows(torch.ones(1, 4), magnitude_score(torch.ones(1, 4)), 0.5)
    assert pruned.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_bad_arguments():
    weight = torch.randn(4, 4)
    for sparsity in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="sparsity"):
            prune_weight(weight, sparsity, "magnitude")
    with pytest.raises(ConfigError, match="unknown pruning method"):
        prune_weight(weight, 0.5, "random")
    with pytest.raises(ConfigError, match="input norms"):
        prune_weight(weight, 0.5, "wanda")
    with pytest.raises(ConfigError, match="input norms have shape"):
        prune_weight(weight, 0.5, "wanda", torch.ones(5))


def test_collector_sums_squared_inputs_per_feature():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    inputs = [torch.randn(2, 5, 6), torch.randn(1, 7, 6)]
    collector = InputNormCollector()
    with torch.no_grad(), collector.watch(block):
        for x in inputs:
            block(x)
        collector.enabled = False
        block(torch.randn(4, 6))  # not counted
    block(torch.randn(4, 6))  # hooks removed: not counted
    expected = sum((x.reshape(-1, 6) ** 2).sum(dim=0) for x in inputs)
    assert torch.allclose(collector.input_sq_sum("0.weight"), expected)
    hidden = [torch.relu(block[0](x)).reshape(-1, 3) for x in inputs]
    assert torch.allclose(collector.input_sq_sum("2.weight"), sum((h**2).sum(dim=0) for h in hidden))
    assert collector.input_sq_sum("1.weight") is None


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73])
def test_same_choice_as_a_stable_sort_with_many_ties(sparsity):
    generator = torch.Generator().manual_seed(3)
    score = torch.randint(0, 4, (16, 50), generator=generator).float()  # heavy ties
    weight = torch.randn(16, 50, generator=generator)
    order = torch.sort(score, dim=1, stable=True).indices
    expected = weight.clone()
    expected.scatter_(1, order[:, : int(50 * sparsity)], 0.0)
    assert torch.equal(prune_rows(weight, score, sparsity), expected)
