"""Mixture-of-Experts models: each expert its own unit in the store, streamed by the router's picks.

Tiny random checkpoints are built offline from MixtralConfig, Qwen3MoeConfig, Qwen2MoeConfig (a
shared expert and its gate), DeepseekV3Config (MLA attention, a dense first layer, a shared expert,
grouped routing) and GptOssConfig (experts fused in the checkpoint, with biases) with transformers'
own save_pretrained, so they carry the tensor names that real checkpoints have
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``, gpt-oss's fused
``mlp.experts.gate_up_proj``). The store's expert units are compared with those tensors, and
the engine's greedy tokens with transformers' own `generate` on the original checkpoint (fp32,
raw values), a batch of prompts of different lengths at most two at a time, with the expert cache
cold, warm, absent, and smaller than one layer's picks, with the next-layer expert prefetch on
(its default) and off; a prefetch whose guesses are made wrong on purpose gives the same tokens.
"""

import json
import math

import pytest
import torch
from test_families import PROMPTS, cut, family_checkpoint, token_logprobs, transformers_greedy

from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.expert_cache import ExpertCache
from endor_ray.engine.sampling import SamplingParams
from endor_ray.engine.scheduler import SchedulerConfig
from endor_ray.format.tensor import decode
from endor_ray.store.store import Store

NUM_EXPERTS = 8
FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
                      head_dim=16),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    # MLA attention, a dense first layer, a shared expert, grouped routing with a score-correction bias
    "deepseek_v3": dict(model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4,
                        n_routed_experts=NUM_EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    # the checkpoint holds experts fused (gate and up interleaved, transposed, biases); sliding layers, sinks
    "gpt_oss": dict(model_type="gpt_oss", num_local_experts=NUM_EXPERTS, num_experts_per_tok=2, intermediate_size=32,
                    head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
}
MOE_LAYERS = {"gpt_oss": [0, 1], "mixtral": [0, 1], "qwen3_moe": [0, 1], "qwen2_moe": [0, 1], "deepseek_v3": [1, 2]}
# the checkpoint's names of layer 1's expert 5 Linears, gate and up first (their order in gate_up_proj)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe.experts.5.{}.weight", ("w1", "w3"), "w2"),
                "qwen3_moe": ("mlp.experts.5.{}_proj.weight", ("gate", "up"), "down"),
                "qwen2_moe": ("mlp.experts.5.{}_proj.weight", ("gate", "up"), "down"),
                "deepseek_v3": ("mlp.experts.5.{}_proj.weight", ("gate", "up"), "down")}
MAX_NEW_TOKENS = [6, 3, 8, 5]


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(request, tmp_path_factory):
    """(family, checkpoint, raw store) for each MoE family."""
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    checkpoint = family_checkpoint(directory / "ckpt", FAMILIES[family])
    store = convert(str(checkpoint), directory / "store", ConvertConfig(method="magnitude", sparsity=0.0),
                    progress=False)
    return family, checkpoint, store


def test_each_expert_is_its_own_unit(moe, capsys):
    from safetensors.torch import load_file

    from endor_ray.cli import main

    family, checkpoint, location = moe
    store = Store(str(location))
    original = load_file(checkpoint / "model.safetensors")
    expert = {name: decode(enc) for name, enc in store.expert_tensors(1, 5).items()}
    if family == "gpt_oss":  # expert 5's slice of each fused tensor
        params = ["down_proj", "down_proj_bias", "gate_up_proj", "gate_up_proj_bias"]
        assert sorted(expert) == params
        for param in params:
            assert torch.equal(expert[param], original[f"model.layers.1.mlp.experts.{param}"][5])
    else:
        pattern, gate_up, down = EXPERT_NAMES[family]
        assert sorted(expert) == ["down_proj", "gate_up_proj"]
        expected_gate_up = torch.cat([original["model.layers.1." + pattern.format(part)] for part in gate_up])
        assert torch.equal(expert["gate_up_proj"], expected_gate_up)
        assert torch.equal(expert["down_proj"], original["model.layers.1." + pattern.format(down)])
    layer = {t["name"] for t in store.manifest["layers"][1]["tensors"]}
    router = "mlp.router.weight" if family == "gpt_oss" else "mlp.gate.weight"
    assert router in layer and not any("mlp.experts" in name for name in layer)  # the router: the layer's
    if family == "qwen2_moe":
        assert {"mlp.shared_expert.gate_proj.weight", "mlp.shared_expert_gate.weight"} <= layer
    if family == "deepseek_v3":  # the dense first layer has no experts; the shared experts are the layer's
        assert store.num_experts(0) == 0 and "mlp.shared_experts.gate_proj.weight" in layer

    assert main(["inspect", str(location), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [idx for idx, layer in enumerate(summary["layers"]) if layer.get("experts") == NUM_EXPERTS] == MOE_LAYERS[family]
    assert summary["layers"][1]["expert_nbytes"] == [e["nbytes"] for e in store.manifest["layers"][1]["experts"]]
    assert main(["inspect", str(location)]) == 0
    assert f"{NUM_EXPERTS} experts" in capsys.readouterr().out
    assert main(["inspect", str(location), "--verify", "--json"]) == 0


def test_export_writes_the_checkpoint_names(moe):
    """`endor export` of an MoE store: the original checkpoint's tensor names and values (a raw store holds
    them exactly), experts cut back into their Linears or stacked as the family's checkpoints hold them,
    and transformers loads the folder to the same model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from endor_ray.store.export import export_checkpoint

    family, checkpoint, location = moe
    exported = export_checkpoint(Store(str(location)), location.parent / "exported", progress=False)
    original = load_file(checkpoint / "model.safetensors")
    written = {}
    for shard in sorted(exported.glob("*.safetensors")):
        written.update(load_file(shard))
    written.setdefault("lm_head.weight", written["model.embed_tokens.weight"])  # a tied head is stored once
    original.setdefault("lm_head.weight", original["model.embed_tokens.weight"])
    assert sorted(written) == sorted(original)
    assert all(torch.equal(written[name], original[name]) for name in original)
    mine = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).state_dict()
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[name], theirs[name]) for name in theirs)


def test_experts_are_compressed_like_any_linear(tmp_path):
    checkpoint = family_checkpoint(tmp_path / "ckpt", FAMILIES["mixtral"])
    store = Store(str(convert(str(checkpoint), tmp_path / "store",
                              ConvertConfig(method="magnitude", sparsity=0.5, values="int8"), progress=False)))
    tensors = store.manifest["layers"][0]["experts"][3]["tensors"]
    assert {t["values_encoding"] for t in tensors} == {"int8"}
    assert all(t["nnz"] == math.prod(t["shape"]) // 2 for t in tensors)
    encoded = store.expert_tensors(0, 3)["gate_up_proj"]
    assert (decode(encoded) != 0).sum(dim=1).tolist() == [encoded.shape[1] // 2] * encoded.shape[0]

    # The engine decodes the compressed experts: its tokens equal transformers' with the store's weights loaded
    [result] = generate(store.location, "0")
    expected = decoded_greedy(checkpoint, store)
    assert [c.token_ids for c in result.completions] == expected
    assert expected != cut(transformers_greedy(checkpoint, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)


def decoded_greedy(checkpoint, store: Store) -> list[list[int]]:
    """transformers' greedy tokens (each prompt alone, fp32) on the checkpoint's model with the store's
    decoded values loaded in place of its weights (the experts stacked as the module holds them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    state = {name: decode(enc) for name, enc in store.dense_tensors().items()}
    for layer_idx in range(store.num_layers):
        state.update({f"model.layers.{layer_idx}.{name}": decode(enc)
                      for name, enc in store.layer_tensors(layer_idx).items()})
        experts = [store.expert_tensors(layer_idx, expert_idx) for expert_idx in range(store.num_experts(layer_idx))]
        for param in experts[0] if experts else ():
            state[f"model.layers.{layer_idx}.mlp.experts.{param}"] = torch.stack([decode(e[param]) for e in experts])
    model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = []
    for ids, count in zip(tokenizer(PROMPTS).input_ids, MAX_NEW_TOKENS):
        with torch.inference_mode():
            row = model.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False, pad_token_id=256)
        expected.append(row[0, len(ids):].tolist())
    return cut(expected, MAX_NEW_TOKENS)


@pytest.fixture(scope="module", params=[(family, values) for family in FAMILIES for values in ("int8", "int4")],
                ids=lambda param: "-".join(param))
def quantized_moe(request, tmp_path_factory):
    """(family, values, checkpoint, store): every expert and Linear stored as dense int8 or int4 values."""
    family, values = request.param
    directory = tmp_path_factory.mktemp(f"{family}-{values}")
    checkpoint = family_checkpoint(directory / "ckpt", FAMILIES[family])
    store = convert(str(checkpoint), directory / "store",
                    ConvertConfig(method="magnitude", sparsity=0.0, values=values, group_size=32), progress=False)
    return family, values, checkpoint, store


def test_quantized_experts_are_multiplied_from_their_blocks(quantized_moe, monkeypatch):
    """On the CPU an int8/int4 expert is never decoded (gpt-oss's, whose module multiplies x @ W, are):
    the cache holds its blocks at their stored bytes, each picked expert's tokens go through the CPU
    product from those blocks, and the tokens are transformers' on the store's decoded values, the
    cache cold, warm, smaller than a layer's picks, and absent."""
    import endor_ray.engine.block_weight as block_weight
    import endor_ray.engine.experts as experts
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.format.cpu_matvec import stored_for_matvec

    family, values, checkpoint, location = quantized_moe
    store = Store(str(location))
    expected = decoded_greedy(checkpoint, store)
    decoded, multiplied = [], []
    decode_into, matvec = experts.decode_into, block_weight.matvec
    monkeypatch.setattr(experts, "decode_into", lambda enc, *args, **kwargs: (decoded.append(enc.shape),
                                                                              decode_into(enc, *args, **kwargs))[1])
    monkeypatch.setattr(block_weight, "matvec", lambda enc, *args, **kwargs: (multiplied.append(enc),
                                                                              matvec(enc, *args, **kwargs))[1])
    transposed = family == "gpt_oss"
    params = [SamplingParams(max_new_tokens=count) for count in MAX_NEW_TOKENS]
    with moe_engine(location, None) as engine:
        cold, warm = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
        cache = engine.model_runner.experts.cache
        held = [weight for weights, _ in cache._entries.values() for weight in weights.values()]
        prefetcher = engine.model_runner.experts.prefetcher  # routers copied out of their layers, blocks kept
        for layer_idx, router in prefetcher._routers.items():
            stored = {t["name"]: t for t in store.manifest["layers"][layer_idx]["tensors"]}
            for name, tensor in router.items():
                entry = stored[f"{prefetcher.router_path}.{name}"]
                kept_blocks = stored_for_matvec(entry["layout"], entry.get("values_encoding"), entry["shape"])
                assert isinstance(tensor, BlockWeight) == kept_blocks
        kept = [weight for weight in held if isinstance(weight, BlockWeight)]
        if transposed:
            assert not kept and decoded  # decoded as before, the tokens still transformers'
        else:
            assert len(kept) == len(held) == 2 * len(cache) and not decoded
            assert {weight.blocks.values_encoding for weight in kept} == {values}
            assert cache.nbytes == sum(weight.blocks.nbytes for weight in kept)  # the blocks' bytes, not bf16's
            file_nbytes = store.manifest["layers"][MOE_LAYERS[family][0]]["experts"][0]["nbytes"]
            assert 0.9 * file_nbytes * len(cache) < cache.nbytes <= file_nbytes * len(cache)
            used = {id(enc) for enc in multiplied}
            assert sum(id(weight.blocks) in used for weight in kept) > len(cache)  # picked ones: both tensors
    for result in (cold, warm):
        assert [c.token_ids for c in result.completions] == expected
    assert warm.stats.to_dict()["experts"]["misses"] == 0
    expert_nbytes = store.manifest["layers"][MOE_LAYERS[family][0]]["experts"][0]["nbytes"]
    if transposed:
        expert_nbytes = sum(math.prod(t["shape"]) * 4 for t in
                            store.manifest["layers"][MOE_LAYERS[family][0]]["experts"][0]["tensors"])
    [small] = generate(location, f"{int(1.5 * expert_nbytes)}B")  # one expert at a time
    [none] = generate(location, "0", expert_prefetch=False)
    results = [small, none]
    if family == "qwen2_moe":  # misses served by a shard server: the blocks kept are copies of what it sent
        results += generate(location, "0", reader=shard_backed_reader(location))
    for result in results:
        assert [c.token_ids for c in result.completions] == expected
    assert small.stats.to_dict()["experts"]["misses"] > cold.stats.to_dict()["experts"]["misses"]
    assert none.stats.to_dict()["experts"]["hit_rate"] == 0.0


def test_an_expert_stack_indexes_to_each_experts_blocks():
    """The stand-in for a fused parameter: an integer (or a 0-d index tensor) gives that expert's own
    BlockWeight, so F.linear multiplies from it; any other use sees the experts decoded and stacked."""
    import torch.nn.functional as F

    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.engine.experts import ExpertStack
    from endor_ray.format import encode
    from endor_ray.format.cpu_matvec import matvec

    generator = torch.Generator().manual_seed(0)
    encs = [encode(torch.randn(24, 64, generator=generator), layout="dense", encoding="int4", group_size=32)
            for _ in range(3)]
    stack = ExpertStack([BlockWeight(enc) for enc in encs])
    assert stack.shape == (3, 24, 64) and stack.dtype == torch.float32 and not stack.is_meta
    with torch.inference_mode():
        for position, enc in enumerate(encs):
            for index in (position, torch.tensor(position)):
                assert isinstance(stack[index], BlockWeight) and stack[index].blocks is enc
            x = torch.randn(2, 64, generator=generator)
            assert torch.equal(F.linear(x, stack[torch.tensor(position)]), matvec(enc, x))
        dense = torch.stack([decode(enc) for enc in encs])
        assert torch.equal(stack[1:], dense[1:]) and torch.equal(stack.transpose(-2, -1), dense.transpose(-2, -1))


def test_the_cache_counts_blocks_at_their_stored_bytes():
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.format import encode

    enc = encode(torch.randn(32, 64), layout="dense", encoding="int8", group_size=32)  # 2048 codes + 64 fp32 scales
    cache = ExpertCache(budget_bytes=3 * enc.nbytes)
    cache.put((0, 0), {"gate_up_proj": BlockWeight(enc, torch.bfloat16)})
    assert cache.nbytes == enc.nbytes == 32 * 64 + 64 * 4  # not 32 * 64 * 2 bfloat16 bytes


def moe_engine(store, expert_cache_memory: str | None, reader=None, expert_prefetch: bool = True) -> Engine:
    return Engine(str(store), EngineConfig(device="cpu", gpu_memory=1, expert_cache_memory=expert_cache_memory,
                                           expert_prefetch=expert_prefetch),
                  progress=False, scheduler=SchedulerConfig(max_num_seqs=2), reader=reader)


def generate(store, expert_cache_memory: str | None, rounds: int = 1, reader=None, expert_prefetch: bool = True):
    """Completions and stats of `rounds` generate calls on one engine (the cache stays warm between)."""
    params = [SamplingParams(max_new_tokens=count, logprobs=1) for count in MAX_NEW_TOKENS]
    with moe_engine(store, expert_cache_memory, reader, expert_prefetch) as engine:
        return [engine.generate(PROMPTS, params) for _ in range(rounds)]


def shard_backed_reader(location):
    """The store's layer reader whose expert reads go to a shard server (layer 0 in memory, 1 on disk),
    as `RayShardReader.expert_bytes` sends them to the shard actors."""
    from endor_ray.engine.readers import StoreReader
    from endor_ray.service.shard_server import ShardServer

    class ShardBacked(StoreReader):
        def expert_bytes(self, layer_idx: int, expert_idx: int) -> torch.Tensor:
            return torch.from_numpy(self.server.expert(layer_idx, expert_idx)[0])

    store = Store(str(location))
    reader = ShardBacked(store, ())
    reader.server = ShardServer(str(location), memory_layers=[0], disk_layers=[1])
    return reader


def test_greedy_tokens_equal_transformers(moe, capsys):
    family, checkpoint, store = moe
    rows = transformers_greedy(checkpoint, max(MAX_NEW_TOKENS))
    expected = cut(rows, MAX_NEW_TOKENS)
    assert sum(len(row) for row in expected) > 10

    cold, warm = generate(store, None, rounds=2)  # the cache holds every expert: the second call hits only
    for result in (cold, warm):
        assert [c.token_ids for c in result.completions] == expected
    cold_stats, warm_stats = cold.stats.to_dict()["experts"], warm.stats.to_dict()["experts"]
    assert 0 < cold_stats["misses"] <= 2 * NUM_EXPERTS  # each expert picked is read once
    assert warm_stats["misses"] == 0 and warm_stats["hit_rate"] == 1.0
    # warm, only the prefetch reads: guesses of experts no pass picked nor guessed before
    file_nbytes = {e["nbytes"] for layer in Store(str(store)).manifest["layers"] for e in layer.get("experts", [])}
    assert cold_stats["bytes_per_token"] > 0 and warm_stats["bytes"] == warm_stats["prefetched"] * file_nbytes.pop()
    assert not file_nbytes  # (a raw store's experts all have one size)

    expert_nbytes = sum(math.prod(t["shape"]) * 4 for t in Store(str(store)).manifest["layers"][1]["experts"][0]["tensors"])
    # One expert at a time, fewer than a layer's picks: each is stacked as soon as it is had, then evicted
    [small] = generate(store, f"{int(1.5 * expert_nbytes)}B")
    assert [c.token_ids for c in small.completions] == expected
    small_stats = small.stats.to_dict()["experts"]
    assert small_stats["misses"] > cold_stats["misses"]
    assert small_stats["hits"] + small_stats["misses"] == cold_stats["hits"] + cold_stats["misses"]
    if family == "qwen2_moe":  # misses served by a shard server, one expert at a time (its plain class, no Ray)
        reader = shard_backed_reader(store)
        [served] = generate(store, "0", reader=reader)
        assert [c.token_ids for c in served.completions] == expected
        server = reader.server
        served_stats = served.stats.to_dict()["experts"]  # the prefetch's reads go to the server too
        assert server.stats.expert_hits == served_stats["misses"] + served_stats["prefetched"]
        assert served_stats["misses"] > 0 and served_stats["prefetched"] > 0
        assert server.stats.hits["memory"] > 0 and server.stats.hits["disk"] > 0  # layer 0's experts held, 1's read
    if family == "mixtral":
        [none] = generate(store, "0", expert_prefetch=False)  # no cache, no prefetch: every pick is read
        assert [c.token_ids for c in none.completions] == expected
        assert none.stats.to_dict()["experts"]["hit_rate"] == 0.0
        from endor_ray.cli import main  # the command line reaches the same engine, the cache option included

        capsys.readouterr()
        prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
        assert main(["generate", str(store), "--in-process", *prompts, "--max-new-tokens", "6", "--gpu-memory", "1",
                     "--device", "cpu", "--expert-cache-memory", "0", "--no-expert-prefetch", "--json"]) == 0
        output = json.loads(capsys.readouterr().out)
        assert [c["token_ids"] for c in output["completions"]] == cut(rows, [6] * len(PROMPTS))
        assert output["stats"]["experts"]["hit_rate"] == 0.0
    if family in ("mixtral", "gpt_oss"):  # greedy tokens of a random model say little: log-probabilities too
        longest = cold.completions[2]
        logprobs = token_logprobs(checkpoint, PROMPTS[2], longest.token_ids)
        assert [logprob for logprob, _ in longest.logprobs] == pytest.approx(logprobs, abs=1e-4)


def test_expert_cache_gets_what_the_gpu_budget_leaves(moe):
    family, _, location = moe
    if family != "mixtral":
        pytest.skip("one family shows the arithmetic")
    layers = Store(str(location)).manifest["layers"]
    dense = sum(math.prod(t["shape"]) * 4 for entry in layers for t in entry["tensors"])  # every layer resident
    expert_nbytes = sum(math.prod(t["shape"]) * 4 for t in layers[0]["experts"][0]["tensors"])
    stack = NUM_EXPERTS * expert_nbytes  # one layer's picks, stacked for its pass: at most all its experts
    with Engine(str(location), EngineConfig(device="cpu", gpu_memory=f"{dense + stack + 3 * expert_nbytes}B",
                                            expert_prefetch=False), progress=False) as engine:
        assert engine.model_runner.experts.cache.budget_bytes == 3 * expert_nbytes
    # the prefetch holds up to one more layer's experts (the next layer's guesses) outside the cache
    with Engine(str(location), EngineConfig(device="cpu", gpu_memory=f"{dense + 2 * stack + 3 * expert_nbytes}B"),
                progress=False) as engine:
        assert engine.model_runner.experts.cache.budget_bytes == 3 * expert_nbytes


def test_prefetch_reads_the_next_layers_guessed_experts(moe):
    """The next layer's router on this layer's hidden state guesses its picks: most guesses are
    picked, each one taken saves a read on demand, and wrong guesses never change a token."""
    family, checkpoint, location = moe
    if family not in ("mixtral", "deepseek_v3"):
        pytest.skip("two families show the prefetch (every family's tokens are checked with it on above)")
    expected = cut(transformers_greedy(checkpoint, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
    params = [SamplingParams(max_new_tokens=count) for count in MAX_NEW_TOKENS]
    [plain] = generate(location, "0", expert_prefetch=False)
    plain_stats = plain.stats.to_dict()["experts"]
    assert plain_stats["prefetched"] == 0 and plain_stats["hit_rate"] == 0.0
    with moe_engine(location, "0") as engine:  # no cache: a pick is either a prefetch taken or a read
        right = engine.generate(PROMPTS, params)
        prefetcher = engine.model_runner.experts.prefetcher
        assert sorted(prefetcher._routers) == MOE_LAYERS[family]  # each router copied once seen
        guess = prefetcher.guess  # now the experts the next layer's router would *not* pick
        prefetcher.guess = lambda *args: sorted(set(range(NUM_EXPERTS)) - set(guess(*args)))
        wrong = engine.generate(PROMPTS, params)
    right_stats, wrong_stats = right.stats.to_dict()["experts"], wrong.stats.to_dict()["experts"]
    for result in (right, wrong):
        assert [c.token_ids for c in result.completions] == expected
    assert right_stats["prefetch_useful"] > 0 and right_stats["hits"] == right_stats["prefetch_useful"]
    assert right_stats["hits"] + right_stats["misses"] == plain_stats["misses"]  # the same picks
    assert right_stats["misses"] == plain_stats["misses"] - right_stats["prefetch_useful"]
    assert right_stats["prefetch_hit_rate"] > 0.5  # the residual stream changes little from layer to layer
    assert wrong_stats["prefetched"] > 0 and wrong_stats["prefetch_hit_rate"] < right_stats["prefetch_hit_rate"]
    assert wrong_stats["misses"] > right_stats["misses"]
    # expert bytes count every read: on demand and ahead
    nbytes = Store(str(location)).manifest["layers"][MOE_LAYERS[family][1]]["experts"][0]["nbytes"]
    assert right_stats["bytes"] == (right_stats["misses"] + right_stats["prefetched"]) * nbytes


def test_metrics_show_the_expert_cache():
    from endor_ray.serve.metrics import ServeMetrics

    metrics = ServeMetrics("tiny")
    metrics.generated({"new_tokens": 4, "experts": {"hit_rate": 0.75, "misses_per_token": 0.5,
                                                    "bytes_per_token": 1024.0}}, prompt_tokens=3)
    text = metrics.render(None).decode()
    assert 'endor_expert_cache_hit_rate{model="tiny"} 0.75' in text
    assert 'endor_expert_misses_per_token{model="tiny"} 0.5' in text
    assert 'endor_expert_bytes_per_token{model="tiny"} 1024.0' in text
    metrics.generated({"new_tokens": 4, "experts": {"prefetch_hit_rate": 0.6}}, prompt_tokens=3)
    assert 'endor_expert_prefetch_hit_rate{model="tiny"} 0.6' in metrics.render(None).decode()


def test_expert_cache_evicts_the_least_recently_used():
    weights = {"w": torch.zeros(4)}  # 16 bytes
    cache = ExpertCache(budget_bytes=32)
    cache.put((0, 1), weights)
    cache.put((0, 2), weights)
    assert cache.get((0, 1)) is weights  # (0, 2) is now the least recently used
    cache.put((1, 0), weights)
    assert (0, 2) not in cache and (0, 1) in cache and (1, 0) in cache and cache.nbytes == 32
    ExpertCache(budget_bytes=8).put((0, 0), weights)  # larger than the budget: never kept
    none = ExpertCache(budget_bytes=0)
    none.put((0, 0), weights)
    assert len(none) == 0
    # a wrong prefetch guess is kept only in free room, as the least recently used
    assert not cache.put_if_room((2, 0), weights) and (2, 0) not in cache  # full: nothing evicted
    roomy = ExpertCache(budget_bytes=48)
    roomy.put((0, 1), weights)
    assert roomy.put_if_room((2, 0), weights)
    roomy.put((0, 3), weights)
    roomy.put((0, 4), weights)  # evicts the guess first
    assert (2, 0) not in roomy and (0, 1) in roomy


def test_expert_reads_drop_their_pages_unless_cached(moe):
    """Buffered expert reads (the default) leave the page cache as they found it, as layer reads do;
    --disk-io cached keeps the pages."""
    import os
    import subprocess

    family, _, location = moe
    if family != "mixtral":
        pytest.skip("one family shows the reads")
    files = sorted(str(path) for path in (location / "layers").glob("*-expert-*.safetensors"))

    def cached_after(disk_io: str) -> int:
        os.sync()  # the store was just written: DONTNEED cannot drop dirty pages
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        with Engine(str(location), EngineConfig(device="cpu", gpu_memory=1, expert_cache_memory="0", disk_io=disk_io),
                    progress=False) as engine:
            engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3))
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(line) for line in out.split())

    assert cached_after("buffered") == 0
    assert cached_after("cached") > 0


def test_a_routers_resident_copy_keeps_its_blocks():
    """The prefetch copies each router out of its (reused) slot: a BlockWeight stays one, over its own bytes."""
    from endor_ray.engine.block_weight import BlockWeight
    from endor_ray.engine.expert_prefetch import _resident_copy
    from endor_ray.format import encode

    weight = BlockWeight(encode(torch.randn(8, 64), layout="dense", encoding="int8", group_size=32))
    copy = _resident_copy(weight)
    assert isinstance(copy, BlockWeight) and torch.equal(copy.blocks.values, weight.blocks.values)
    assert copy.blocks.values.data_ptr() != weight.blocks.values.data_ptr()
    assert copy.blocks.scales.data_ptr() != weight.blocks.scales.data_ptr()
    weight.blocks.values.zero_()  # the slot reused: the copy keeps the router's weights
    assert not torch.equal(copy.blocks.values, weight.blocks.values)
