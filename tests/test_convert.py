"""convert -> store -> export -> transformers, against pruning the model in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from endor_ray.models.architecture import is_prunable
from endor_ray.compress.calibration import self_calibration_ids
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.store.export import export_checkpoint
from endor_ray.compress.prune import InputNormCollector, prune_weight
from endor_ray.store import Store

from conftest import TINY_CONFIGS, read_manifest


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prune_in_memory(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Magnitude-prune every 2-D weight under the decoder layers, in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and is_prunable(name, param):
                param.copy_(prune_weight(param, sparsity, "magnitude"))
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 200, 3, 99, 42], [7, 7, 8, 250, 1, 0]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_magnitude_export_matches_in_memory_pruning(family, tiny_checkpoints, tmp_path):
    source = tiny_checkpoints[family]
    store = convert(str(source), tmp_path / "store", ConvertConfig(sparsity=0.5, method="magnitude", block_size=256), progress=False)
    exported = export_checkpoint(Store(str(store)), tmp_path / "hf", progress=False)
    expected = prune_in_memory(load(source), 0.5)
    actual = load(exported)
    weights_equal(actual, expected)
    assert torch.equal(logits(actual), logits(expected))
    layouts = {t["layout"] for layer in read_manifest(store)["layers"] for t in layer["tensors"] if len(t["shape"]) == 2}
    assert layouts == {"bitmap"}


def wanda_in_memory(model: torch.nn.Module, ids: torch.Tensor, sparsity: float) -> torch.nn.Module:
    """Wanda as its paper's code does it, on a fully loaded model: layer i is calibrated on the
    outputs of the already-pruned layers 0..i-1 (here by rerunning the whole model each time)."""
    layers = model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers
    with torch.no_grad():
        for layer in layers:
            collector = InputNormCollector()
            with collector.watch(layer):
                model(input_ids=ids, use_cache=False)
            for name, param in layer.named_parameters():
                if is_prunable(name, param):
                    param.copy_(prune_weight(param, sparsity, "wanda", collector.input_sq_sum(name)))
    return model


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_wanda_matches_reference_implementation(family, tiny_checkpoints, tmp_path):
    source = tiny_checkpoints[family]
    config = ConvertConfig(sparsity=0.6, method="wanda", block_size=256, calib_samples=4, calib_seq_len=12, seed=3)
    store = convert(str(source), tmp_path / "store", config, progress=False)
    exported = load(export_checkpoint(Store(str(store)), tmp_path / "hf", progress=False))

    reference = load(source)
    ids = self_calibration_ids(reference, config.calib_samples, config.calib_seq_len, config.seed)
    reference = wanda_in_memory(reference, ids, 0.6)
    weights_equal(exported, reference)
    # ...and it is not just magnitude pruning under another name.
    down_proj = f"{layers_prefix(family)}0.fc2.weight" if family == "opt" else f"{layers_prefix(family)}0.mlp.down_proj.weight"
    magnitude = prune_in_memory(load(source), 0.6)
    assert not torch.equal(magnitude.state_dict()[down_proj], exported.state_dict()[down_proj])
    assert read_manifest(store)["compression"]["calibration"]["source"] == "self-generated"


def layers_prefix(family: str) -> str:
    return "model.decoder.layers." if family == "opt" else "model.layers."


def test_dtype_and_dense_format(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama-gqa"]
    sparse = convert(str(source), tmp_path / "sparse", ConvertConfig(method="magnitude", dtype="float16", block_size=256), progress=False)
    dense = convert(str(source), tmp_path / "dense", ConvertConfig(method="magnitude", dtype="float16", store_format="dense"), progress=False)
    assert {t["layout"] for layer in read_manifest(dense)["layers"] for t in layer["tensors"]} == {"dense"}
    sparse_hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(Store(str(sparse)), tmp_path / "a", progress=False))
    dense_hf = AutoModelForCausalLM.from_pretrained(export_checkpoint(Store(str(dense)), tmp_path / "b", progress=False))
    assert sparse_hf.dtype == torch.float16
    weights_equal(sparse_hf, dense_hf)
    expected = prune_in_memory(load(source).half(), 0.5)
    weights_equal(sparse_hf, expected)
    assert Store(str(sparse)).summary()["layers_ratio"] < 0.65  # tiny layers: norms and headers weigh more
    assert Store(str(dense)).summary()["layers_ratio"] == pytest.approx(1.0, abs=0.02)


def test_calibration_from_text_file(tmp_path, tokenized_checkpoints):
    # A few sentences written for this test (no copied prose), repeated to give enough tokens; the
    # model is a tiny one with SmolLM2's tokenizer (the file is read and tokenized as for SmolLM2).
    text = "Weights stream from host memory to the device one layer at a time. " * 40
    (tmp_path / "calib.txt").write_text(text)
    config = ConvertConfig(method="wanda", calib_text=tmp_path / "calib.txt", calib_samples=2, calib_seq_len=32)
    store = convert(str(tokenized_checkpoints["llama-gqa"]), tmp_path / "store", config, progress=False)
    calibration = read_manifest(store)["compression"]["calibration"]
    assert calibration == {"source": "file", "file": "calib.txt", "num_samples": 2, "seq_len": 32}


def test_streamed_calibration_equals_resident(tiny_checkpoints, tmp_path, monkeypatch):
    """A model too large for memory calibrates by streamed passes (with the next layer prefetched);
    the store is byte for byte the one the resident path writes."""
    import endor_ray.compress.calibrated as calibrated_module

    source = tiny_checkpoints["llama-gqa"]
    config = ConvertConfig(sparsity=0.5, method="wanda", block_size=256, calib_samples=3, calib_seq_len=10, seed=5)
    resident = convert(str(source), tmp_path / "resident", config, progress=False)
    monkeypatch.setattr(calibrated_module, "free_memory", lambda: 1)  # nothing fits: stream
    streamed = convert(str(source), tmp_path / "streamed", config, progress=False)
    for layer in read_manifest(resident)["layers"]:
        assert (resident / layer["file"]).read_bytes() == (streamed / layer["file"]).read_bytes()


def test_prefetching_reads_the_next_layer_ahead():
    import threading

    from endor_ray.models.skeleton import prefetching

    calls, ready = [], threading.Event()

    def load(layer_idx):
        calls.append(layer_idx)
        if layer_idx == 1:
            ready.set()
        return {"w": torch.full((1,), float(layer_idx))}

    with prefetching(load, num_layers=3) as load_next:
        assert load_next(0)["w"].item() == 0
        assert ready.wait(5)  # layer 1 was read before anyone asked for it
        assert [load_next(i)["w"].item() for i in (1, 2, 0)] == [1, 2, 0]
    assert calls[:4] == [0, 1, 2, 0]
    assert not any(t.name.startswith("endor-prefetch") for t in threading.enumerate())


def test_a_budget_holds_for_the_layer_files_bytes(tiny_checkpoints, tmp_path):
    """--bytes-per-weight bounds what the layer files weigh (headers and alignment too), as fidelity reports it."""
    config = ConvertConfig(bytes_per_weight=0.6, dtype="bfloat16", calib_samples=2, calib_seq_len=16)
    summary = Store(str(convert(str(tiny_checkpoints["llama-gqa"]), tmp_path / "s", config, progress=False))).summary()
    weights = sum(layer["weights"] for layer in summary["layers"])
    assert summary["layers_nbytes"] <= 0.6 * weights
    assert summary["layers_nbytes"] >= 0.55 * weights  # and spends it
