"""Calibrated conversion of MoE models: Wanda and SparseGPT on each expert, from the tokens routed to it.

Tiny random Mixtral and DeepSeek-V3 checkpoints (`test_moe`'s builders). The reference for what an
expert saw is transformers' own model on the calibration ids: its router's picks and the hidden
states handed to the experts module (caught by a forward pre-hook, not by the converter's
TorchFunctionMode), each expert's Linear inputs recomputed from the checkpoint's weights in the
order transformers' loop takes the tokens. The first MoE layer's inputs are the unpruned model's
(Wanda prunes a layer after its own forward), so its masks follow from them exactly. The engine's
tokens on the stores are compared with transformers' generate on the stores' exported checkpoints.
"""

import pytest
import torch
from test_families import PROMPTS, cut, family_checkpoint, transformers_greedy
from test_moe import FAMILIES, MAX_NEW_TOKENS

from endor_ray.compress.calibration import text_calibration_ids
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.compress.prune import prune_rows, wanda_score
from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.sampling import SamplingParams
from endor_ray.errors import ConfigError
from endor_ray.format.tensor import decode
from endor_ray.store.export import export_checkpoint
from endor_ray.store.store import Store

SAMPLES, SEQ_LEN = 4, 32
FIRST_MOE = {"mixtral": 0, "deepseek_v3": 1, "gpt_oss": 0}  # gpt-oss: x @ W, W [in, out]


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog while the river runs to the sea. " * 8)
    return path


def routed_inputs(family: str, checkpoint, store: Store, ids: torch.Tensor, layer_idx: int
                  ) -> dict[int, dict[str, torch.Tensor]]:
    """Per expert of `layer_idx`, the sums over its routed tokens of each Linear's input squared, from
    transformers' model with the layers before it as pruned (Wanda calibrates each layer on the pruned
    layers' outputs): {expert: {'gate_up_proj': [hidden], 'down_proj': [inter]}}."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for before in range(layer_idx):  # dense layers (DeepSeek-V3's first)
        pruned = {name: decode(enc) for name, enc in store.layer_tensors(before).items()}
        assert not model.model.layers[before].load_state_dict(pruned, strict=True).missing_keys
    experts = model.model.layers[layer_idx].mlp.experts
    seen = {}
    handle = experts.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    hidden, top_k_index, _ = seen["args"]
    sums = {}
    for expert in torch.unique(top_k_index).tolist():
        _, token_idx = torch.where((top_k_index == expert).T)  # transformers' loop order: by pick, then token
        x = hidden[token_idx]
        if family == "gpt_oss":  # x @ W [in, out] with a bias, its own gate
            inner = experts._apply_gate(x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert])
        else:
            gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
            inner = experts.act_fn(gate) * up
        sums[expert] = {"gate_up_proj": (x * x).sum(0), "down_proj": (inner * inner).sum(0)}
    return sums


def engine_greedy(store) -> list[list[int]]:
    params = [SamplingParams(max_new_tokens=count) for count in MAX_NEW_TOKENS]
    with Engine(str(store), EngineConfig(device="cpu", gpu_memory=1), progress=False) as engine:
        return [c.token_ids for c in engine.generate(PROMPTS, params).completions]


@pytest.mark.parametrize("family", list(FIRST_MOE))
def test_wanda_prunes_each_expert_by_its_routed_inputs(tmp_path, calib_text, family):
    from transformers import AutoTokenizer

    checkpoint = family_checkpoint(tmp_path / "ckpt", FAMILIES[family])
    config = ConvertConfig(method="wanda", sparsity=0.5, calib_text=str(calib_text), calib_samples=SAMPLES,
                           calib_seq_len=SEQ_LEN)
    store = Store(str(convert(str(checkpoint), tmp_path / "store", config, progress=False)))
    record = store.manifest["compression"]["calibration"]
    assert record["num_samples"] == SAMPLES and record["experts_without_tokens"] >= 0

    layer = FIRST_MOE[family]
    ids = text_calibration_ids(AutoTokenizer.from_pretrained(checkpoint), calib_text, SAMPLES, SEQ_LEN)
    sums = routed_inputs(family, checkpoint, store, ids, layer)
    assert len(sums) > 1
    from safetensors.torch import load_file

    original = {name: tensor for name, tensor in load_file(checkpoint / "model.safetensors").items()}
    differs_from_magnitude = 0
    for expert, inputs in sums.items():
        stored = {name: decode(enc) for name, enc in store.expert_tensors(layer, expert).items()}
        unit = {param: stored[param] for param in inputs}
        for param, sq_sum in inputs.items():
            weight = exported_weight(original, family, layer, expert, param)
            if family == "gpt_oss":  # each output (a column) loses half its inputs, as a Linear's rows do
                expected = prune_rows(weight.T, wanda_score(weight.T, sq_sum), 0.5).T
            else:
                expected = prune_rows(weight, wanda_score(weight, sq_sum), 0.5)
            assert torch.equal(unit[param] != 0, expected != 0), (expert, param)
            assert torch.equal(unit[param], expected)  # kept values unchanged (raw)
            magnitude = (prune_rows(weight.T, weight.T.abs(), 0.5).T if family == "gpt_oss"
                         else prune_rows(weight, weight.abs(), 0.5))
            differs_from_magnitude += not torch.equal(expected != 0, magnitude != 0)
    assert differs_from_magnitude  # the routed inputs decided, not the weights alone
    # the router is never pruned
    router = {"mixtral": "block_sparse_moe.gate", "deepseek_v3": "mlp.gate", "gpt_oss": "mlp.router"}[family]
    assert torch.equal(decode(store.layer_tensors(layer)[router.replace("block_sparse_moe", "mlp") + ".weight"]),
                       original[f"model.layers.{layer}.{router}.weight"])

    exported = export_checkpoint(store, tmp_path / "exported", progress=False)
    expected_tokens = cut(transformers_greedy(exported, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
    assert engine_greedy(store.location) == expected_tokens


def exported_weight(original: dict, family: str, layer: int, expert: int, param: str) -> torch.Tensor:
    """The checkpoint's weight for one expert's unit tensor (gate and up rows concatenated)."""
    if family == "gpt_oss":  # fused in the checkpoint
        return original[f"model.layers.{layer}.mlp.experts.{param}"][expert]
    if family == "mixtral":
        parts = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}[param]
        names = [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{part}.weight" for part in parts]
    else:
        parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}[param]
        names = [f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight" for part in parts]
    return torch.cat([original[name] for name in names])


def test_sparsegpt_compensates_inside_each_expert(tmp_path, calib_text):
    """SparseGPT with INT4 values on Mixtral: the kept weights of each expert are updated (not the
    checkpoint's), and the engine generates what transformers does on the exported store."""
    checkpoint = family_checkpoint(tmp_path / "ckpt", FAMILIES["mixtral"])
    config = ConvertConfig(method="sparsegpt", sparsity=0.5, values="int4", calib_text=str(calib_text),
                           calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    store = Store(str(convert(str(checkpoint), tmp_path / "store", config, progress=False)))
    tensors = store.manifest["layers"][1]["experts"][0]["tensors"]
    assert {t["values_encoding"] for t in tensors} == {"int4"}
    exported = export_checkpoint(store, tmp_path / "exported", progress=False)
    expected = cut(transformers_greedy(exported, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
    assert engine_greedy(store.location) == expected
    assert expected != cut(transformers_greedy(checkpoint, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)


def test_one_budget_covers_the_experts(tmp_path, calib_text):
    """--bytes-per-weight on DeepSeek-V3 (dense first layer, shared and routed experts): the layer
    files and expert files together within the budget, the experts' settings chosen per tensor
    (not all alike), and the engine's tokens transformers' on the exported store."""
    checkpoint = family_checkpoint(tmp_path / "ckpt", FAMILIES["deepseek_v3"])
    config = ConvertConfig(bytes_per_weight=0.7, calib_text=str(calib_text), calib_samples=SAMPLES,
                           calib_seq_len=SEQ_LEN)
    store = Store(str(convert(str(checkpoint), tmp_path / "store", config, progress=False)))
    summary = store.summary()
    assert summary["layers_bytes_per_weight"] <= 0.7
    expert_nbytes = sum(sum(layer.get("expert_nbytes", [])) for layer in summary["layers"])
    assert expert_nbytes > summary["layers_nbytes"] / 2  # the experts are most of the bytes budgeted
    settings = {(t["values_encoding"], t["nnz"]) for layer in store.manifest["layers"]
                for expert in layer.get("experts", []) for t in expert["tensors"]}
    assert len(settings) > 1
    exported = export_checkpoint(store, tmp_path / "exported", progress=False)
    assert engine_greedy(store.location) == cut(transformers_greedy(exported, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)


def test_what_moe_calibration_does_not_cover_is_refused(tmp_path):
    gpt_oss = family_checkpoint(tmp_path / "gpt_oss", FAMILIES["gpt_oss"])
    for config in (ConvertConfig(method="sparsegpt", sparsity=0.5), ConvertConfig(bytes_per_weight=0.6)):
        with pytest.raises(ConfigError, match="x @ W"):
            convert(str(gpt_oss), tmp_path / "a", config, progress=False)
    assert not (tmp_path / "a").exists()
