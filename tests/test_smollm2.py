"""End to end on the embedded SmolLM2-135M: compression ratio, exactness, Wanda against magnitude."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from endor_ray.models.architecture import is_prunable
from endor_ray.compress.calibration import perplexity, self_calibration_ids
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.store.export import export_checkpoint
from endor_ray.compress.prune import prune_weight
from endor_ray.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stores(smollm2_dir, smollm2_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    calib = dict(calib_samples=8, calib_seq_len=64, seed=0)
    return {
        "magnitude": smollm2_store,  # conftest's: the same ConvertConfig(method="magnitude"), built once
        "wanda": convert(str(smollm2_dir), root / "wanda", ConvertConfig(method="wanda", **calib), progress=False),
        "fp16": convert(str(smollm2_dir), root / "fp16", ConvertConfig(method="magnitude", dtype="float16"), progress=False),
    }


def test_compression_ratio_at_half_sparsity(stores):
    summary = Store(str(stores["fp16"])).summary()
    print(f"\nSmolLM2 fp16 at 50%: layers {summary['layers_ratio']:.4f} of dense, "
          f"whole store {summary['total_ratio']:.4f}")
    assert summary["layers_sparsity"] == pytest.approx(0.5, abs=0.002)
    assert summary["layers_ratio"] <= 0.565


def test_export_matches_in_memory_pruning(stores, smollm2_dir, tmp_path):
    exported = AutoModelForCausalLM.from_pretrained(export_checkpoint(Store(str(stores["magnitude"])), tmp_path / "hf", progress=False))
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".layers." in name and is_prunable(name, param):
                param.copy_(prune_weight(param, 0.5, "magnitude"))
        ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
        assert torch.equal(exported(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_wanda_beats_magnitude(stores, smollm2_dir, tmp_path):
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    held_out = self_calibration_ids(dense, num_samples=8, seq_len=96, seed=1234)  # not the calibration seed
    results = {"dense": perplexity(dense, held_out)}
    for method in ("magnitude", "wanda"):
        model = AutoModelForCausalLM.from_pretrained(export_checkpoint(Store(str(stores[method])), tmp_path / method, progress=False))
        results[method] = perplexity(model, held_out)
    print("\nSmolLM2 at 50% sparsity, perplexity on held-out self-generated text:", json.dumps(results))
    assert results["dense"] < results["wanda"] < results["magnitude"]
