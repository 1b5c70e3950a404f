"""Linear weights held as their blocks on the CPU (`endor_ray.engine.block_weight`): nn.Linear takes
them as parameters, small batches multiply from the blocks (the CPU product, then one rounding),
larger ones see the dense decode bit for bit, releasing a layer drops them; and the engine hands
them out for dense quantized stores, with the same greedy tokens as decoding first."""

import json

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


def test_layers_kept_in_their_blocks_are_planned_at_their_file_bytes(int4_store):
    """The memory plan counted a CPU layer at its dense bytes although its Linears stay in their
    blocks (a 7B Q4_0 layer: 0.38 GiB planned, 0.11 GiB held), so tight limits reread most layers."""
    from endor_ray.engine.model_runner import ModelRunner

    planned = {}
    for cpu_matvec in (True, False):
        runner = ModelRunner(str(int4_store), EngineConfig(device="cpu", cpu_matvec=cpu_matvec), progress=False)
        try:
            planned[cpu_matvec] = runner._decoded_nbytes(runner.store.manifest["layers"])
        finally:
            runner.close()
    entries = json.loads((int4_store / "manifest.json").read_text())["layers"]
    dense, held = planned[False]
    assert held == dense and all(d > e["nbytes"] for d, e in zip(dense, entries))  # decoded: dense bytes
    dense, held = planned[True]
    for decoded, resident, entry in zip(dense, held, entries):
        linears = sum(len(t["shape"]) == 2 for t in entry["tensors"])
        assert linears == 7 and resident == entry["nbytes"] + decoded  # its file's bytes, the norms decoded
        assert decoded == sum(t["shape"][0] * 2 for t in entry["tensors"] if len(t["shape"]) == 1)  # bf16 norms


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


@pytest.mark.parametrize("encoding", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_an_embedding_gathers_its_rows_from_the_blocks(encoding, monkeypatch):
    """A GGUF embedding table (a kept store's, on the CPU): each lookup decodes only the rows it names,
    bit for bit the reference decode's, whatever the encoding (each has whole blocks per row)."""
    enc = encode(torch.randn(40, 256, generator=torch.Generator().manual_seed(1)), layout="dense", encoding=encoding)
    with torch.device("meta"):
        embedding = nn.Embedding(40, 256).requires_grad_(False)
    embedding.load_state_dict({"weight": BlockWeight(enc, torch.bfloat16)}, assign=True)
    expected = decode(enc).to(torch.bfloat16)
    monkeypatch.setattr(BlockWeight, "dense", lambda self: pytest.fail("the whole table was decoded"))
    ids = torch.tensor([[3, 0, 39, 3], [7, 7, 1, 2]])
    with torch.inference_mode():
        assert torch.equal(embedding(ids), expected[ids])
        with pytest.raises(IndexError, match="outside the 40 rows"):
            embedding(torch.tensor([40]))


def test_an_lm_head_without_a_product_decodes_for_its_product():
    enc = encode(torch.randn(32, 256), layout="dense", encoding="q3_k")  # no CPU product from q3_k blocks
    x = torch.randn(1, 256)
    assert torch.equal(F.linear(x, BlockWeight(enc)), F.linear(x, decode(enc)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_q6_k_lm_head_multiplies_from_its_blocks(dtype, monkeypatch):
    """llama.cpp's Q4_0 / Q4_K_M files store the LM head as q6_k: a decode step multiplies from its
    blocks (never decoding the [vocab, hidden] table), a prefill still sees the dense decode's product."""
    from endor_ray.engine.block_weight import block_weight_or_none, rows_of_whole_blocks

    generator = torch.Generator().manual_seed(2)
    enc = encode(torch.randn(96, 512, generator=generator), layout="dense", encoding="q6_k")
    assert rows_of_whole_blocks(enc)
    head = block_weight_or_none(enc, dtype, threads=2)
    assert isinstance(head, BlockWeight)
    dense = decode(enc).to(dtype)
    large = torch.randn(MAX_MATVEC_ROWS + 1, 512, generator=generator).to(dtype)
    with torch.inference_mode():
        assert torch.equal(F.linear(large, head), F.linear(large, dense))
        monkeypatch.setattr(BlockWeight, "dense", lambda self: pytest.fail("the LM head was decoded"))
        x = torch.randn(1, 3, 512, generator=generator).to(dtype)
        expected = matvec(enc, x.reshape(3, 512).float()).to(dtype).view(1, 3, 96)
        assert torch.equal(F.linear(x, head), expected)
    flat = encode(torch.randn(8, 576, generator=generator), layout="dense", encoding="q6_k")  # flattened blocks
    assert block_weight_or_none(flat, dtype, threads=2) is None
