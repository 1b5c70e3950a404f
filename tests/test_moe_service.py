"""Mixture-of-Experts stores through the Ray side, unchanged: Serve, the service's shard servers, the batch job.

One local Ray on 127.0.0.1 for the module, shared by everything here. Tiny random Mixtral, DeepSeek-V3
(MLA, a dense first layer, a shared expert) and gpt-oss (experts fused in the checkpoint, with biases)
checkpoints are built offline from their config classes (`test_moe`'s builders) and converted raw;
every reference is transformers' own `generate` on the original checkpoint (fp32), never our engine.
With `gpu_memory` 0 every layer streams from a shard server (the store's bytes over Ray), and each
expert the router picks that the expert cache lacks (or the next-layer prefetch guesses) is one
`expert_ref` call to the shard server owning its layer (a memory-tier layer's experts are held in the
object store, a disk-tier layer's read from the store per call). Checked:

- Serve: the OpenAI API (the real `openai` client) answers completions and chat with transformers'
  greedy text; requests of different lengths at once share passes (continuous batching); /metrics
  shows the expert cache's hit rate and misses and bytes per token, cold then warm.
- The service (`connect`) on the other two: token-identical with no expert cache, every expert read (on
  demand or ahead) served by the shard servers of both tiers (their count equals the engine's reads).
- The batch job (Ray Data, `endor_ray.jobs.generate`) with an expert cache smaller than a layer's picks:
  every row's tokens equal transformers', each id exactly once, a rerun adding nothing; and the stores of
  Qwen2-MoE, Gemma 3 and Phi-3, whose layer units differ most from Mixtral's, through the same job.
"""

import json
import math
import threading
import urllib.request

import pytest
from test_families import FAMILIES as DENSE_FAMILIES
from test_families import PROMPTS, cut, family_checkpoint, token_logprobs, transformers_greedy
from test_moe import FAMILIES as MOE_FAMILIES

from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.engine.config import EngineConfig
from endor_ray.engine.sampling import SamplingParams
from endor_ray.store.store import Store

PORT = 8135
BASE = f"http://127.0.0.1:{PORT}"
MAX_NEW_TOKENS = [6, 3, 8, 5]
LONGEST = 24  # the long request the short ones join
SERVICE_FAMILIES = ["deepseek_v3", "gpt_oss"]  # (Qwen-MoE differs from Mixtral only inside its layer unit)
# A byte tokenizer has no chat template: a plain one, so that chat has a prompt to apply
CHAT_TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "user", "content": "Say hello."}]


def moe_store(root, family: str):
    """(checkpoint, raw store) of a tiny random MoE family, with a chat template."""
    checkpoint = family_checkpoint(root / "ckpt", MOE_FAMILIES[family])
    (checkpoint / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    store = convert(str(checkpoint), root / "store", ConvertConfig(method="magnitude", sparsity=0.0), progress=False)
    return checkpoint, store


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    return {"mixtral": moe_store(tmp_path_factory.mktemp("mixtral"), "mixtral")}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def up_to_the_first_moe_layer(store) -> str:
    """A shard budget that holds the layers up to the first MoE layer (its experts included) in memory and
    leaves the rest to the disk tier."""
    layers = Store(str(store)).manifest["layers"]
    first = next(idx for idx, layer in enumerate(layers) if layer.get("experts"))
    held = sum(layer["nbytes"] + sum(expert["nbytes"] for expert in layer.get("experts", []))
               for layer in layers[:first + 1])
    return f"{held}B"


def expert_nbytes(store) -> int:
    """One expert's weights as the engine holds them (fp32)."""
    tensors = Store(str(store)).manifest["layers"][0]["experts"][0]["tensors"]
    return sum(math.prod(t["shape"]) * 4 for t in tensors)


# --- Serve ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(local_ray, stores):
    from ray import serve

    from endor_ray.serve import build_app

    checkpoint, store = stores["mixtral"]
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    try:
        # room for every expert: a repeated request finds its experts in the cache
        app = build_app({"store": str(store), "model_name": "moe", "engine.gpu_memory": 0, "engine.device": "cpu",
                         "engine.expert_cache_memory": f"{64 * expert_nbytes(store)}B",
                         "cluster.shard_memory": up_to_the_first_moe_layer(store)})
        serve.run(app, name="endor-moe", route_prefix="/")
        yield checkpoint
    finally:
        serve.shutdown()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", timeout=120, max_retries=0)


def metrics() -> dict[str, float]:
    with urllib.request.urlopen(f"{BASE}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("endor_expert")}


def expected_text(checkpoint, prompts: list[str], lengths: list[int]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rows = cut(transformers_greedy(checkpoint, max(lengths), prompts), lengths)
    assert all(rows), rows  # an empty completion would compare nothing
    return [tokenizer.decode(row) for row in rows]


def test_metrics_show_the_expert_cache_cold_then_warm(client, server):
    """The first request reads its experts from the shard servers; the same request again finds them cached."""
    [expected] = expected_text(server, PROMPTS[:1], [6])
    cold = client.completions.create(model="moe", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert cold.choices[0].text == expected
    cold_figures = metrics()
    assert 0 <= cold_figures["endor_expert_cache_hit_rate"] < 1
    assert cold_figures["endor_expert_misses_per_token"] > 0 and cold_figures["endor_expert_bytes_per_token"] > 0
    warm = client.completions.create(model="moe", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert warm.choices[0].text == expected
    warm_figures = metrics()
    assert warm_figures["endor_expert_cache_hit_rate"] == 1.0 and warm_figures["endor_expert_misses_per_token"] == 0
    # what is still read is the next-layer prefetch's guesses outside the cache, if any
    assert warm_figures["endor_expert_bytes_per_token"] < cold_figures["endor_expert_bytes_per_token"]


def test_completions_and_chat_equal_transformers(client, server):
    from transformers import AutoTokenizer

    response = client.completions.create(model="moe", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=1)
    assert response.choices[0].text == expected_text(server, PROMPTS[1:2], [8])[0]
    # greedy tokens of a random model say little: their log-probabilities are transformers' too
    [ids] = cut(transformers_greedy(server, 8, PROMPTS[1:2]), [8])
    assert response.choices[0].logprobs.token_logprobs == pytest.approx(token_logprobs(server, PROMPTS[1], ids),
                                                                         abs=1e-4)
    pieces = [chunk.choices[0].text for chunk in
              client.completions.create(model="moe", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
              if chunk.choices]
    assert "".join(pieces) == response.choices[0].text

    prompt = AutoTokenizer.from_pretrained(server).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<assistant>")  # the template above (the server has it from the store)
    chat = client.chat.completions.create(model="moe", messages=CHAT, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == expected_text(server, [prompt], [5])[0]


def test_requests_of_different_lengths_share_passes(client, server):
    """Continuous batching on an MoE store: short requests join a long one's passes (the union of the
    rows' picked experts fetched once per layer), and each gets transformers' tokens."""
    prompts = ["Long ago, far away,", *PROMPTS]
    lengths = [LONGEST, *MAX_NEW_TOKENS]
    expected = {prompt: text for prompt, text in zip(prompts, expected_text(server, prompts, lengths))}
    answers: dict[str, str] = {}
    long_started = threading.Event()

    def ask(prompt: str, max_tokens: int) -> None:
        if max_tokens == LONGEST:  # streamed: its first token says it is running
            chunks = client.completions.create(model="moe", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True)
            texts = []
            for chunk in chunks:
                long_started.set()
                texts.extend(choice.text for choice in chunk.choices)
            answers[prompt] = "".join(texts)
        else:
            long_started.wait(timeout=120)
            answers[prompt] = client.completions.create(model="moe", prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(prompt, length)) for prompt, length in zip(prompts, lengths)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert answers == expected
    with urllib.request.urlopen(f"{BASE}/health", timeout=30) as answer:
        health = json.load(answer)
    assert health["status"] == "ok" and max(health["batching"]["recent_sequences_per_pass"]) > 1


# --- the service: shard servers serving single experts --------------------------------------------------

@pytest.mark.parametrize("family", SERVICE_FAMILIES)
def test_shard_servers_serve_the_experts(local_ray, tmp_path, family):
    """The other families (Serve above runs Mixtral through the same service): DeepSeek-V3's dense first
    layer (no experts to serve), shared expert and MLA; gpt-oss's experts with biases (fused in its checkpoint)."""
    from endor_ray.service.driver import ClusterConfig, connect

    checkpoint, store = moe_store(tmp_path, family)
    expected = cut(transformers_greedy(checkpoint, max(MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
    params = [SamplingParams(max_new_tokens=count) for count in MAX_NEW_TOKENS]
    # no expert cache: every picked expert of every pass is a shard server's
    with connect(str(store), EngineConfig(gpu_memory=0, device="cpu", expert_cache_memory="0"),
                 ClusterConfig(shard_memory=up_to_the_first_moe_layer(store))) as service:
        assert service.placement.memory and service.placement.disk  # the first MoE layer held, the last read per call
        result = service.generate(PROMPTS, params)
        assert [c["token_ids"] for c in result["completions"]] == expected
        experts = result["stats"]["experts"]
        # no cache: a hit is an expert the next-layer prefetch read ahead (through the shard servers as well)
        assert experts["misses"] > 0 and experts["hits"] == experts.get("prefetch_useful", 0)
        [shard] = service.shard_stats().values()
        assert shard["expert_hits"] == experts["misses"] + experts.get("prefetched", 0)
        assert shard["hits"]["memory"] > 0 and shard["hits"]["disk"] > 0


# --- the batch job --------------------------------------------------------------------------------------

def test_batch_job_on_an_moe_store(local_ray, stores, tmp_path):
    from endor_ray.jobs.parts import PartFolder

    checkpoint, store = stores["mixtral"]
    prompts = {f"row-{idx}": prompt for idx, prompt in enumerate(PROMPTS)}
    expected = dict(zip(prompts, cut(transformers_greedy(checkpoint, 5), [5] * len(PROMPTS))))
    source = tmp_path / "prompts.jsonl"
    cache = ["--expert-cache-memory", f"{2 * expert_nbytes(store)}B"]  # smaller than a layer's picks

    source.write_text("".join(json.dumps({"id": row_id, "prompt": prompt}) + "\n"
                              for row_id, prompt in prompts.items()))
    run_job(store, source, tmp_path / "out", *cache)
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_generated"] == len(prompts) and summary["tokens"] == sum(map(len, expected.values()))
    run_job(store, source, tmp_path / "out", *cache)  # a rerun finds every id done (tests/test_jobs.py: resuming)
    table = PartFolder(str(tmp_path / "out")).read_all()
    assert sorted(table.column("id").to_pylist()) == sorted(prompts)  # each id exactly once
    assert {row["id"]: row["token_ids"] for row in table.to_pylist()} == expected
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["rows_generated"] == 0 and summary["rows_skipped"] == len(prompts)


def run_job(store, source, out, *extra: str) -> None:
    from endor_ray.jobs.generate import main

    assert main(["--store", str(store), "--input", str(source), "--output", str(out), "--max-new-tokens", "5",
                 "--gpu-memory", "0", "--device", "cpu", "--batch-size", "2", *extra]) == 0


# The Ray side is the same for every family (the shard servers ship a layer unit's tensors, the worker runs
# the engine tests/test_families.py and tests/test_moe.py check family by family), and each run of it costs
# ~15 s of actor start-up here: beside Mixtral above, the families whose layer units differ most from it,
# through the batch job (Ray Data, the service's shard servers streaming every layer, its worker): Qwen2-MoE
# (a gated shared expert beside the routed ones), Gemma 3 (sliding and global layers, four norms, soft-capping)
# and Phi-3 (fused qkv and gate_up), each row's tokens transformers' own.
OTHER_FAMILIES = {"qwen2_moe": MOE_FAMILIES["qwen2_moe"], "gemma3_text": DENSE_FAMILIES["gemma3_text"][0],
                  "phi3": DENSE_FAMILIES["phi3"][0]}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_run_as_a_batch_job(local_ray, tmp_path, family):
    from endor_ray.jobs.parts import PartFolder

    checkpoint = family_checkpoint(tmp_path / "ckpt", OTHER_FAMILIES[family])
    store = convert(str(checkpoint), tmp_path / "store", ConvertConfig(method="magnitude", sparsity=0.0),
                    progress=False)
    expected = dict(enumerate(cut(transformers_greedy(checkpoint, 5), [5] * len(PROMPTS))))
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": str(idx), "prompt": prompt}) + "\n"
                              for idx, prompt in enumerate(PROMPTS)))
    run_job(store, source, tmp_path / "out")
    rows = PartFolder(str(tmp_path / "out")).read_all().to_pylist()
    assert {int(row["id"]): row["token_ids"] for row in rows} == expected and len(rows) == len(PROMPTS)
