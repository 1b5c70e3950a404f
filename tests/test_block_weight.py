"""Linear weights held as their blocks on the CPU (`endor_ray.engine.block_weight`): nn.Linear takes
them as parameters, small batches multiply from the blocks (the CPU product, then one rounding),
larger ones see the dense decode bit for bit, releasing a layer drops them; and the engine hands
them out for dense quantized stores, with the same greedy tokens as decoding first."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.block_weight import MAX_MATVEC_ROWS, BlockWeight
from endor_ray.engine.sampling import SamplingParams
from endor_ray.format import encode
from endor_ray.format.cpu_matvec import matvec
from endor_ray.format.tensor import decode
from endor_ray.models.skeleton import decoder_layers, materialize_layer, release_layer

from test_engine import PROMPTS


def meta_linear(enc, bias: bool = False) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(enc.shape[1], enc.shape[0], bias=bias, dtype=enc.dtype)
    return linear.requires_grad_(False)


@pytest.mark.parametrize("encoding", ["int8", "int4", "q4_1", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_linear_multiplies_from_the_blocks(encoding, dtype):
    generator = torch.Generator().manual_seed(0)
    enc = encode(torch.randn(48, 96, generator=generator).to(dtype), layout="dense", encoding=encoding,
                 **({"group_size": 32} if encoding.startswith("int") else {}))
    bias = torch.randn(48, generator=generator).to(dtype)
    linear = meta_linear(enc, bias=True)
    with torch.inference_mode():  # as the engine runs
        linear.load_state_dict({"weight": BlockWeight(enc, threads=2), "bias": bias}, strict=True, assign=True)
        assert isinstance(linear.weight, BlockWeight) and isinstance(linear.weight, nn.Parameter)
        small = torch.randn(2, 3, 96, generator=generator).to(dtype)  # 6 rows
        expected = (matvec(enc, small.reshape(6, 96).float()) + bias.float()).to(dtype).view(2, 3, 48)
        assert torch.equal(linear(small), expected)
        large = torch.randn(MAX_MATVEC_ROWS + 1, 96, generator=generator).to(dtype)
        assert torch.equal(linear(large), F.linear(large, decode(enc), bias))
        assert torch.equal(linear.weight, decode(enc))  # any other op sees the dense decode
    release_layer(linear)
    assert linear.weight.is_meta and not isinstance(linear.weight, BlockWeight)


def test_a_wider_compute_dtype_uses_the_stored_values():
    """float32 compute over a bf16 store: the weights are the bf16 decode, widened exactly."""
    enc = encode(torch.randn(16, 64, dtype=torch.bfloat16), layout="dense", encoding="int4", group_size=32)
    weight = BlockWeight(enc, torch.float32)
    assert weight.dtype == torch.float32 and torch.equal(weight.dense(), decode(enc).float())
    x = torch.randn(1, 64)
    assert torch.equal(F.linear(x, weight), matvec(enc, x))


@pytest.fixture(scope="module")
def int4_store(tokenized_checkpoints, tmp_path_factory):
    config = ConvertConfig(0.0, "magnitude", values="int4", group_size=32, dtype="bfloat16", block_size=256)
    return convert(str(tokenized_checkpoints["llama-gqa"]), tmp_path_factory.mktemp("int4") / "store", config,
                   progress=False)


@pytest.mark.parametrize("placement", [dict(gpu_memory=None), dict(gpu_memory=0, prefetch_depth=1)])
def test_the_engine_multiplies_from_blocks_with_the_same_tokens(int4_store, placement):
    tokens = {}
    for cpu_matvec in (True, False):
        config = EngineConfig(device="cpu", compute_dtype="float32", cpu_matvec=cpu_matvec, **placement)
        with Engine(str(int4_store), config, progress=False) as engine:
            source = engine.model_runner.source
            kinds = {type(weight) for layer in source.resident.values() for weight in layer.values()}
            if placement["gpu_memory"] is None:  # all resident: the Linears' weights stay blocks, or not
                assert (BlockWeight in kinds) == cpu_matvec
            completions, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
            tokens[cpu_matvec] = [completion.token_ids for completion in completions]
            if placement["gpu_memory"] == 0:
                layers = decoder_layers(engine.model, engine.store.architecture)
                assert all(param.is_meta for param in layers[0].parameters())  # released after the pass
    assert tokens[True] == tokens[False] and any(tokens[True])


def test_materialize_takes_block_weights():
    """The skeleton's own materialize/release (used by stream_layers) accept a BlockWeight as is."""
    enc = encode(torch.randn(8, 32), layout="dense", encoding="int8", group_size=32)
    layer = nn.Sequential(meta_linear(enc))
    materialize_layer(layer, {"0.weight": BlockWeight(enc)})
    assert layer[0].weight.blocks is enc
    release_layer(layer)
    assert layer[0].weight.is_meta


@pytest.mark.parametrize("inference", [False, True])
def test_release_never_decodes(monkeypatch, inference):
    """release_layer hands the blocks back without a decode, in inference_mode too (where `.to`
    reaches the subclass as to.dtype_layout and Module._apply asks _has_compatible_shallow_copy_type):
    each decode there cost a streamed 7B layer's weight ~50 ms per pass."""
    enc = encode(torch.randn(8, 32), layout="dense", encoding="int8", group_size=32)
    layer = nn.Sequential(meta_linear(enc))

    def no_decode(self):
        raise AssertionError("release decoded the blocks")

    monkeypatch.setattr(BlockWeight, "dense", no_decode)
    with torch.inference_mode(inference):
        materialize_layer(layer, {"0.weight": BlockWeight(enc)})
        release_layer(layer)
    assert layer[0].weight.is_meta
