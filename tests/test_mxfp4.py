"""gpt-oss's MXFP4 release checkpoints (endor_ray.compress.mxfp4): decoded bit for bit as transformers
decodes them, and a tiny random MXFP4 gpt-oss converts and generates transformers' own tokens (transformers
loading the same MXFP4 checkpoint, which it de-quantizes on the CPU)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families import PROMPTS, cut, family_checkpoint, transformers_greedy
from test_moe import FAMILIES

from endor_ray.compress.checkpoint import Checkpoint
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.compress.mxfp4 import dequantize, gpt_oss_expert_tensor
from endor_ray.engine import Engine, EngineConfig
from endor_ray.errors import StoreError, UnsupportedModelError
from endor_ray.store.store import Store

MAX_NEW_TOKENS = [6, 3, 8, 5]


def random_mxfp4(shape: tuple[int, ...], seed: int, scales=(0, 255)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=generator, dtype=torch.uint8)
    return blocks, torch.randint(*scales, shape, generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoding_equals_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4((3, 40, 5), seed=1)  # every E8M0 byte but NaN's, every code (-0.0 included)
    ours = gpt_oss_expert_tensor(blocks, scales)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (3, 5 * 32, 40)
    assert torch.equal(ours.to(dtype).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # -0.0 too


def test_the_format_by_hand():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x9_2  # element 0: code 2 (+1.0), element 1: code 9 (-0.5)
    blocks[0, 0, 15] = 0x7_8  # element 30: code 8 (-0.0), element 31: code 7 (+6.0)
    values = dequantize(blocks, torch.tensor([[130]], dtype=torch.uint8))[0]  # scale 2 ** 3
    assert values[:2].tolist() == [8.0, -4.0] and values[31] == 48.0
    assert values[30] == 0 and torch.signbit(values[30]) and not values[2:30].any()
    with pytest.raises(ValueError, match="do not match"):
        dequantize(blocks, torch.zeros(1, 2, dtype=torch.uint8))


def mxfp4_checkpoint(root):
    """A tiny random gpt-oss checkpoint with its experts in MXFP4, as the release checkpoints hold them."""
    checkpoint = family_checkpoint(root / "bf", FAMILIES["gpt_oss"])
    tensors = load_file(str(checkpoint / "model.safetensors"))
    for idx, name in enumerate([name for name in tensors if name.endswith(("gate_up_proj", "down_proj"))]):
        experts, inputs, outputs = tensors.pop(name).shape
        blocks, scales = random_mxfp4((experts, outputs, inputs // 32), seed=idx, scales=(118, 126))
        tensors |= {name + "_blocks": blocks, name + "_scales": scales}
    save_file(tensors, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


def test_an_mxfp4_gpt_oss_converts_and_generates_transformers_tokens(tmp_path):
    checkpoint = mxfp4_checkpoint(tmp_path)
    source = Checkpoint(checkpoint)
    assert "model.layers.0.mlp.experts.gate_up_proj" in source.tensor_names
    assert not [name for name in source.tensor_names if name.endswith(("_blocks", "_scales"))]
    assert source.shape("model.layers.1.mlp.experts.down_proj") == tuple(
        source.get("model.layers.1.mlp.experts.down_proj").shape) == (8, 32, 64)
    store = convert(str(checkpoint), tmp_path / "store", ConvertConfig(method="magnitude", sparsity=0.0),
                    progress=False)
    assert "quantization_config" not in Store(str(store)).config
    with Engine(str(store), EngineConfig(device="cpu", gpu_memory=1), progress=False) as engine:
        from endor_ray.engine.sampling import SamplingParams

        completions = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW_TOKENS]).completions
    # transformers reads MXFP4 and de-quantizes it (with Hugging Face's `kernels` installed, as transformers
    # 5.25 requires, it would otherwise fetch an MXFP4 kernel from the Hub)
    from transformers import Mxfp4Config

    greedy = transformers_greedy(checkpoint, max(MAX_NEW_TOKENS), quantization_config=Mxfp4Config(dequantize=True))
    expected = cut(greedy, MAX_NEW_TOKENS)
    assert [c.token_ids for c in completions] == expected and sum(map(len, expected)) > 10


def test_mxfp4_checkpoints_that_cannot_be_read_say_why(tmp_path):
    checkpoint = mxfp4_checkpoint(tmp_path)
    broken = tmp_path / "no-pairs"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    save_file({name: tensor for name, tensor in tensors.items() if not name.endswith("_scales")},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StoreError, match="no tensor has the _blocks and _scales pair"):
        Checkpoint(broken)
    config = json.loads((checkpoint / "config.json").read_text())
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    shutil.copy(checkpoint / "model.safetensors", other / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="MXFP4 weights are read for gpt-oss checkpoints only, not 'llama'"):
        Checkpoint(other)
