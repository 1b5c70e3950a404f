"""GGUF import: names, llama.cpp's q/k row order, blocks kept byte for byte, decoded as gguf-py and
transformers de-quantize them, and the engine's tokens equal to transformers' on the same weights.

A tiny random llama written with gguf-py's GGUFWriter (q/k rows permuted as llama.cpp's
convert_hf_to_gguf.py does, blocks from gguf.quants.quantize) checks the mapping fast; the
embedded SmolLM2-135M GGUF (Q4_1) checks the real thing against transformers' own GGUF loader.
"""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors import safe_open
from safetensors.torch import load_file

from endor_ray.cli import main
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.compress.default_model import gguf_path
from endor_ray.compress.gguf_source import GGUFSource, hf_row_order
from endor_ray.errors import ConfigError
from endor_ray.format import decode, quantize_blocks
from endor_ray.format.cpu_decode import decode_into
from endor_ray.store import Store

from conftest import make_checkpoint, read_manifest

Q8_0, Q4_0, F16, F32 = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.F16,
                        GGMLQuantizationType.F32)
# HF name within a layer -> (GGUF name, type written): attention in Q8_0, the MLP in Q4_0, norms and biases in F32.
TINY_LAYER = {
    "self_attn.q_proj.bias": ("attn_q.bias", F32), "self_attn.k_proj.bias": ("attn_k.bias", F32),
    "self_attn.v_proj.bias": ("attn_v.bias", F32),
    "self_attn.q_proj.weight": ("attn_q.weight", Q8_0), "self_attn.k_proj.weight": ("attn_k.weight", Q8_0),
    "self_attn.v_proj.weight": ("attn_v.weight", Q8_0), "self_attn.o_proj.weight": ("attn_output.weight", Q8_0),
    "mlp.gate_proj.weight": ("ffn_gate.weight", Q4_0), "mlp.up_proj.weight": ("ffn_up.weight", Q4_0),
    "mlp.down_proj.weight": ("ffn_down.weight", Q4_0),
    "input_layernorm.weight": ("attn_norm.weight", F32), "post_attention_layernorm.weight": ("ffn_norm.weight", F32),
}
TINY_DENSE = {"model.embed_tokens.weight": ("token_embd.weight", F16), "model.norm.weight": ("output_norm.weight", F32),
              "lm_head.weight": ("output.weight", Q8_0)}
FAMILIES = {"llama-gqa": "llama", "qwen2": "qwen2"}  # tiny checkpoint -> GGUF architecture (llama permutes q/k)
Q3_K, Q2_K, IQ4_NL = GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q2_K, GGMLQuantizationType.IQ4_NL
LOW_BIT = (Q3_K, Q2_K, IQ4_NL)  # gguf-py cannot quantize these: their blocks come from the format's port of
# llama.cpp's quantizers (bit-exact against libggml in test_gguf_blocks.py)
LOW_BIT_LAYER = {"self_attn": Q3_K, "mlp.gate_proj": Q2_K, "mlp.up_proj": Q2_K, "mlp.down_proj": IQ4_NL}
Q4_K, Q5_K, Q6_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K
K_TYPES = (Q4_K, Q5_K, Q6_K)  # gguf-py cannot quantize these either
K_LAYER = {"self_attn": Q4_K, "mlp.gate_proj": Q5_K, "mlp.up_proj": Q5_K, "mlp.down_proj": Q6_K}


def tiny_gguf_name(name: str) -> tuple[str, GGMLQuantizationType]:
    """(GGUF name, type written) of HF tensor `name` in the tiny GGUFs."""
    if name in TINY_DENSE:
        return TINY_DENSE[name]
    _, _, layer_idx, short = name.split(".", 3)
    gguf_name, qtype = TINY_LAYER[short]
    return f"blk.{layer_idx}.{gguf_name}", qtype


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head: the kv heads for k_proj)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_of(weight: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a GGUF file holds for `weight` in `qtype` (blocks for a quantized type)."""
    array = weight.numpy()
    if qtype == F32:
        return array.astype(np.float32)
    if qtype == F16:
        return array.astype(np.float16)
    if qtype in LOW_BIT or qtype in K_TYPES:
        return quantize_blocks(weight, qtype.name.lower()).numpy().reshape(array.shape[0], -1)
    return quantize(array, qtype)


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request, tmp_path_factory):
    """(GGUF path, the HF config and weights it was made from): Q8_0 attention, a Q4_0 MLP."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    hf_dir = make_checkpoint(root / "hf", request.param)
    weights = load_file(hf_dir / "model.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    write_gguf(root / "tiny.gguf", FAMILIES[request.param], config, weights, tiny_gguf_name)
    return root / "tiny.gguf", config, weights


def write_gguf(path, architecture: str, config: dict, weights: dict, naming) -> None:
    """A GGUF file of `weights` (HF names; `naming(name)` gives its GGUF name and type) as llama.cpp's
    converter writes one, with a byte-level tokenizer (256 one-byte tokens) so that transformers
    builds its config and tokenizer as for any GGUF."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = GGUFWriter(path, architecture)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(bytes_to_unicode().values()))
    writer.add_token_types([1] * 256)
    writer.add_token_scores([0.0] * 256)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    for name, weight in weights.items():
        gguf_name, qtype = naming(name)
        data = gguf_of(weight, qtype)
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = llama_cpp_permute(data, config["num_attention_heads" if "q_proj" in name
                                                  else "num_key_value_heads"])
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (F32, F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_hf_row_order_undoes_llama_cpp_permute():
    rows = torch.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        permuted = torch.from_numpy(llama_cpp_permute(rows.numpy(), heads))
        assert torch.equal(permuted[hf_row_order(24, heads)], rows)


def test_names_values_and_blocks_of_a_tiny_gguf(tiny):
    path, config, weights = tiny
    source = GGUFSource(path)
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rope_parameters"):
        assert source.config[key] == config[key], key
    assert source.config["rms_norm_eps"] == np.float32(config["rms_norm_eps"])  # GGUF keeps a float32
    assert sorted(source.tensor_names) == sorted(weights)
    for name, weight in weights.items():
        qtype = tiny_gguf_name(name)[1]
        assert source.shape(name) == tuple(weight.shape), name
        # Blocks are per row, so quantizing the HF (un-permuted) weight is an independent reference.
        expected = gguf_of(weight, qtype)
        assert torch.equal(source.get(name), torch.from_numpy(dequantize(expected, qtype)).reshape(weight.shape)), name
        blocks = source.blocks(name)
        if qtype in (F32, F16):
            assert blocks is None
        else:
            assert blocks.encoding == qtype.name.lower() and blocks.shape == tuple(weight.shape)
            assert torch.equal(blocks.data, torch.from_numpy(expected)), name


def test_cli_keeps_the_blocks_of_a_tiny_gguf(tiny, tmp_path, capsys):
    path, config, weights = tiny
    source = GGUFSource(path)
    store = tmp_path / "store"
    assert main(["convert", str(path), str(store), "--block-size", "256", "--quiet"]) == 0  # keep: the default
    assert main(["inspect", str(store)]) == 0
    assert "values  q4_0+q8_0: the GGUF file's own blocks" in capsys.readouterr().out
    compression = read_manifest(store)["compression"]
    assert (compression["method"], compression["values"], compression["sparsity"]) == ("gguf", "q4_0+q8_0", 0.0)
    opened = Store(str(store))
    stored = {f"model.layers.{layer_idx}.{short}": enc for layer_idx in range(config["num_hidden_layers"])
              for short, enc in opened.layer_tensors(layer_idx).items()}
    assert sorted(stored) == sorted(name for name in weights if ".layers." in name)
    for name, enc in stored.items():
        qtype = tiny_gguf_name(name)[1]
        expected = gguf_of(weights[name], qtype)
        if qtype == F32:
            assert enc.values_encoding == "raw"
        else:
            assert enc.values_encoding == qtype.name.lower() and enc.layout == "dense"
            assert torch.equal(enc.values, torch.from_numpy(expected).reshape(-1)), name
        assert torch.equal(decode(enc), source.get(name)), name


def low_bit_gguf_name(name: str) -> tuple[str, GGMLQuantizationType]:
    """The tiny GGUF's names, with attention in Q3_K, gate and up in Q2_K, down in IQ4_NL."""
    gguf_name, qtype = tiny_gguf_name(name)
    for prefix, low_bit in LOW_BIT_LAYER.items():
        if f".{prefix}" in name and name.endswith("proj.weight"):
            return gguf_name, low_bit
    return gguf_name, qtype


def k_gguf_name(name: str) -> tuple[str, GGMLQuantizationType]:
    """The tiny GGUF's names with a Q4_K_M file's kind of types: attention Q4_K, gate/up Q5_K, down and
    the LM head Q6_K."""
    gguf_name, qtype = tiny_gguf_name(name)
    if name == "lm_head.weight":
        return gguf_name, Q6_K
    for prefix, k_type in K_LAYER.items():
        if f".{prefix}" in name and name.endswith("proj.weight"):
            return gguf_name, k_type
    return gguf_name, qtype


def test_a_k_type_store_multiplies_from_its_blocks_on_the_cpu(tmp_path):
    """A kept Q4_K/Q5_K/Q6_K GGUF on the CPU: the decoder Linears and the Q6_K LM head stay blocks and
    multiply from them (no decoded copy of the head), with the greedy tokens of decoding everything."""
    from test_engine import PROMPTS

    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.engine.sampling import SamplingParams

    hf_dir = make_checkpoint(tmp_path / "hf", "llama-gqa", hidden_size=256, intermediate_size=512,
                             num_hidden_layers=2)  # rows of whole 256-weight super-blocks
    config = json.loads((hf_dir / "config.json").read_text())
    write_gguf(tmp_path / "k.gguf", "llama", config, load_file(hf_dir / "model.safetensors"), k_gguf_name)
    store = convert(str(tmp_path / "k.gguf"), tmp_path / "store", ConvertConfig(values="keep"), progress=False)
    assert read_manifest(store)["compression"]["values"] == "q4_k+q5_k+q6_k"
    tokens = {}
    for cpu_matvec in (True, False):
        config = EngineConfig(device="cpu", compute_dtype="float32", cpu_matvec=cpu_matvec, gpu_memory=None)
        with Engine(str(store), config, progress=False) as engine:
            head = engine.model_runner.model.lm_head.weight
            assert isinstance(head, BlockWeight) == cpu_matvec
            source = engine.model_runner.source
            encodings = {weight.blocks.values_encoding for layer in source.resident.values()
                         for weight in layer.values() if isinstance(weight, BlockWeight)}
            assert encodings == ({"q4_k", "q5_k", "q6_k"} if cpu_matvec else set())
            if cpu_matvec:
                assert head.blocks.values_encoding == "q6_k"
            completions, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
            tokens[cpu_matvec] = [completion.token_ids for completion in completions]
    assert tokens[True] == tokens[False] and any(tokens[True])


@pytest.fixture(scope="module")
def low_bit(tmp_path_factory):
    """(GGUF path, config, weights) of a tiny llama whose Linears are Q3_K, Q2_K and IQ4_NL."""
    root = tmp_path_factory.mktemp("low-bit-gguf")
    hf_dir = make_checkpoint(root / "hf", "llama-gqa", hidden_size=256, intermediate_size=512,
                             num_hidden_layers=2)  # rows of whole 256-weight blocks everywhere
    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    write_gguf(root / "low-bit.gguf", "llama", config, weights, low_bit_gguf_name)
    return root / "low-bit.gguf", config, weights


def test_low_bit_blocks_are_kept_exactly(low_bit, tmp_path):
    """A GGUF holding Q3_K, Q2_K and IQ4_NL tensors converts with --values keep to a store of the
    file's own bytes, decoded (torch reference and C decoder) as gguf-py de-quantizes them."""
    path, config, weights = low_bit
    assert {tensor.tensor_type for tensor in GGUFReader(path).tensors} >= set(LOW_BIT)
    store = tmp_path / "store"
    assert main(["convert", str(path), str(store), "--values", "keep", "--quiet"]) == 0
    assert read_manifest(store)["compression"]["values"] == "iq4_nl+q2_k+q3_k"
    opened, source = Store(str(store)), GGUFSource(path)
    for layer_idx in range(config["num_hidden_layers"]):
        for short, enc in opened.layer_tensors(layer_idx).items():
            name = f"model.layers.{layer_idx}.{short}"
            qtype = low_bit_gguf_name(name)[1]
            if qtype not in LOW_BIT:
                continue
            expected = gguf_of(weights[name], qtype)  # per row: the HF-order weight's blocks
            assert enc.values_encoding == qtype.name.lower()
            assert torch.equal(enc.values, torch.from_numpy(expected).reshape(-1)), name
            want = torch.from_numpy(dequantize(expected, qtype)).reshape(weights[name].shape)
            assert torch.equal(decode(enc), want) and torch.equal(source.get(name), want), name
            assert torch.equal(decode_into(enc, torch.empty_like(want), threads=2), want), name


def assert_engine_matches_transformers(store, tmp_path) -> None:
    """Greedy tokens of the engine (one layer resident) == transformers' on the exported weights."""
    from test_quantized_stores import exported_greedy

    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.engine.sampling import SamplingParams

    prompts = ["hello there", "a b c d e f"]
    expected = exported_greedy(store, tmp_path, prompts, max_new_tokens=6)
    with Engine(str(store), EngineConfig(gpu_memory=1), progress=False) as engine:
        completions, _ = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [completion.token_ids for completion in completions] == expected
    assert any(expected)


def test_engine_matches_transformers_on_a_low_bit_kept_store(low_bit, tmp_path):
    store = convert(str(low_bit[0]), tmp_path / "store", ConvertConfig(values="keep"), progress=False)
    assert_engine_matches_transformers(store, tmp_path)


def test_a_gguf_recompresses_from_its_dequantized_weights(tiny, tmp_path):
    path, _, weights = tiny
    store = tmp_path / "store"
    assert main(["convert", str(path), str(store), "--sparsity", "0", "--method", "magnitude", "--quiet"]) == 0
    tensors = Store(str(store)).layer_tensors(1)
    assert all(enc.values_encoding == "raw" for enc in tensors.values())
    expected = torch.from_numpy(dequantize(gguf_of(weights["model.layers.1.mlp.up_proj.weight"], Q4_0), Q4_0))
    assert torch.equal(decode(tensors["mlp.up_proj.weight"]), expected.reshape(160, 64))


def test_engine_matches_transformers_on_a_tiny_kept_store(tiny, tmp_path):
    path, _, _ = tiny
    store = convert(str(path), tmp_path / "store", ConvertConfig(values="keep", block_size=256), progress=False)
    assert_engine_matches_transformers(store, tmp_path)


def test_a_file_that_is_not_gguf_is_a_clean_error(tiny, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "short.gguf").write_bytes(tiny[0].read_bytes()[:200])  # cut inside the metadata
    for name in ("notes.txt", "short.gguf"):
        assert main(["convert", str(tmp_path / name), str(tmp_path / "store")]) == 1
        assert "as a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_keep_is_refused_where_it_cannot_apply(tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        convert(str(tiny_checkpoints["llama-gqa"]), tmp_path / "store", ConvertConfig(values="keep"), progress=False)
    assert main(["convert", str(tiny_checkpoints["llama-gqa"]), str(tmp_path / "store"), "--values", "keep"]) == 1
    assert "--values keep stores a GGUF file's own blocks" in capsys.readouterr().err
    assert main(["convert", "smollm2-135m", str(tmp_path / "store"), "--values", "keep", "--sparsity", "0.5"]) == 1
    assert "drop --sparsity" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="--values keep"):
        ConvertConfig(values="keep", sparsity=0.5)
    with pytest.raises(ConfigError, match="--values keep"):
        ConvertConfig(values="keep", bytes_per_weight=0.6)
    assert ConvertConfig(values="keep").sparsity == 0.0 and ConvertConfig().sparsity == 0.5


# -- the embedded model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kept_stores(smollm2_dir, tmp_path_factory):
    """The embedded model converted with its blocks kept, through the CLI's defaults (float32) and in bf16."""
    root = tmp_path_factory.mktemp("smollm2-gguf")
    assert main(["convert", "smollm2-135m", str(root / "f32"), "--quiet"]) == 0
    convert("smollm2-135m", root / "bf16", ConvertConfig(values="keep", dtype="bfloat16"), progress=False)
    return {"float32": root / "f32", "bfloat16": root / "bf16"}



@pytest.mark.slow
def test_embedded_blocks_are_the_files_own(kept_stores):
    """Stored bytes == the GGUF's, rows un-permuted by transformers' own reverse permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(gguf_path())
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    store = Store(str(kept_stores["float32"]))
    linear_bytes = linear_weights = 0
    for layer_idx in range(30):
        tensors = store.layer_tensors(layer_idx)
        for short, (gguf_short, _) in TINY_LAYER.items():
            if not short.endswith("_proj.weight"):
                continue
            gguf_name = f"blk.{layer_idx}.{gguf_short}"
            expected = unpermute.process(np.array(gguf_tensors[gguf_name].data), gguf_name).weights
            enc = tensors[short]
            assert enc.values_encoding == "q4_1", gguf_name
            assert torch.equal(enc.values, torch.from_numpy(expected.copy()).reshape(-1)), gguf_name
            linear_bytes, linear_weights = linear_bytes + enc.nbytes, linear_weights + enc.numel
    assert linear_bytes / linear_weights == 0.625  # Q4_1: 20 bytes per 32 weights
    embedding = store.dense_tensors()["model.embed_tokens.weight"]  # tied: the LM head too
    assert embedding.values_encoding == "q8_0" and embedding.nbytes == gguf_tensors["token_embd.weight"].n_bytes
    assert torch.equal(embedding.values, torch.from_numpy(np.array(gguf_tensors["token_embd.weight"].data)).view(-1))
    summary = store.summary()
    assert summary["compression"]["values"] == "q4_1"
    assert all(tensor["bytes_per_weight"] == 0.625 for layer in summary["layers"] for tensor in layer["tensors"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_store_decodes_as_transformers_dequantizes(kept_stores, smollm2_dir, dtype):
    """Reference decode of every tensor == transformers' GGUF de-quantization (the cached folder), in the store's dtype."""
    reference = safe_open(str(smollm2_dir / "model.safetensors"), framework="pt")
    store = Store(str(kept_stores[dtype]))
    tensors = dict(store.dense_tensors())
    for layer_idx in range(30):
        tensors |= {f"model.layers.{layer_idx}.{name}": enc for name, enc in store.layer_tensors(layer_idx).items()}
    assert sorted(tensors) == sorted(reference.keys())
    for name, enc in tensors.items():
        expected = reference.get_tensor(name).to(getattr(torch, dtype))
        assert torch.equal(decode(enc), expected), name


@pytest.mark.slow
def test_engine_matches_transformers_on_the_kept_blocks(kept_stores, tmp_path):
    from test_quantized_stores import exported_greedy

    from endor_ray.engine import Engine, EngineConfig
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.engine.sampling import SamplingParams

    store = kept_stores["float32"]
    prompts = ["The capital of France is", "One, two, three,"]
    expected = exported_greedy(store, tmp_path, prompts, max_new_tokens=6)
    with Engine(str(store), EngineConfig(gpu_memory=0), progress=False) as engine:
        completions, _ = engine.generate(prompts, SamplingParams(max_new_tokens=6))
        model = engine.model_runner.model  # the tied q8_0 table: looked up and multiplied from its blocks
        assert isinstance(model.lm_head.weight, BlockWeight) and model.model.embed_tokens.weight is model.lm_head.weight
    assert [completion.token_ids for completion in completions] == expected
    assert any(expected)


@pytest.mark.slow
def test_the_embedded_model_is_its_gguf_only_when_blocks_are_kept(smollm2_dir):
    from endor_ray.compress.checkpoint import Checkpoint
    from endor_ray.compress.default_model import open_source

    kept = open_source("smollm2-135m", keep_blocks=True)
    assert isinstance(kept, GGUFSource) and kept.directory == smollm2_dir
    assert type(open_source("smollm2-135m")) is Checkpoint  # re-compression reads the cached folder, as before


@pytest.mark.slow
def test_a_user_gguf_gets_its_config_and_tokenizer_from_transformers(smollm2_dir):
    source = GGUFSource(gguf_path())  # no folder given: transformers reads the file's metadata
    cached = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "vocab_size"):
        assert source.config[key] == cached[key], key
    assert {path.name for path in source.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}
    from transformers import AutoTokenizer

    text = "What is the capital of France?"
    assert (AutoTokenizer.from_pretrained(source.directory)(text).input_ids
            == AutoTokenizer.from_pretrained(smollm2_dir)(text).input_ids)

