"""The offloaded engine against transformers' own generate on the same pruned weights.

Correctness matrix (CPU, fp32): SmolLM2 (Llama), a random-weight OPT and a random-weight Llama
with grouped-query attention; batch 1 and a batch of 4 prompts of different lengths; layers all
streamed, split between resident and streamed, and streamed from host memory and from disk.
"""

import json
import shutil
import threading

import pytest
import torch

from endor_ray.engine import Engine, EngineConfig
from endor_ray.utils.units import parse_budget
from endor_ray.errors import ConfigError, StoreError
from endor_ray.engine.tiers import plan_tiers
from endor_ray.engine.reference import reference_greedy
from endor_ray.engine.sampling import SamplingParams

from conftest import read_manifest

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def add(a, b):",
    "Hi",
]
PLACEMENTS = {  # name -> EngineConfig fields
    "all-streamed": dict(gpu_memory=0),
    "mixed": dict(gpu_memory=1, prefetch_depth=1),
    "disk": dict(gpu_memory=0, host_memory="0", prefetch_depth=3),
    "host-and-disk": dict(gpu_memory=1, host_memory="1MB", prefetch_depth=2),
}


def check_against_transformers(store, placement: str, prompts: list[str], max_new_tokens: int = 6) -> None:
    with Engine(str(store), EngineConfig(**PLACEMENTS[placement]), progress=False) as engine:
        completions, stats = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        expected = reference_greedy(engine, prompts, max_new_tokens)
        plan = engine.plan
    assert [c.token_ids for c in completions] == expected
    assert any(len(ids) > 0 for ids in expected)
    streamed_layers = len(plan.host) + len(plan.disk)
    assert stats.source.hits["host"] + stats.source.hits["disk"] == stats.passes * streamed_layers
    if placement == "disk":
        assert plan.disk and not plan.host and stats.source.hits["host"] == 0
    if placement == "mixed":
        assert plan.device == (0,) and plan.streamed


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
def test_random_models_match_transformers(tiny_stores, family, placement):
    check_against_transformers(tiny_stores[family], placement, PROMPTS)
    check_against_transformers(tiny_stores[family], placement, PROMPTS[1:2])


@pytest.mark.slow
@pytest.mark.parametrize("placement,prompts", [("all-streamed", PROMPTS[:1]), ("host-and-disk", PROMPTS)])
def test_smollm2_matches_transformers(smollm2_store, placement, prompts):
    check_against_transformers(smollm2_store, placement, prompts, max_new_tokens=8)


def test_tier_plan():
    compressed, dense = [100] * 6, [400] * 6
    assert plan_tiers(compressed, dense, prefetch_depth=2, device_budget_bytes=2400).device == tuple(range(6))
    # three slots of (100 + 400) bytes, then two resident layers of 400 fit; a third does not
    plan = plan_tiers(compressed, dense, prefetch_depth=2, device_budget_bytes=3 * 500 + 2 * 400 + 50)
    assert plan.device == (0, 1) and plan.host == (2, 3, 4, 5) and plan.disk == ()
    plan = plan_tiers(compressed, dense, prefetch_depth=1, device_layers=2, host_budget_bytes=250)
    assert plan.device == (0, 1) and plan.host == (2, 3) and plan.disk == (4, 5)
    assert plan_tiers(compressed, dense, prefetch_depth=1, device_layers=99).device == tuple(range(6))
    with pytest.raises(ConfigError, match=r"\(1499 bytes\) is below the minimum 1.5 KiB \(1500 bytes\) for streaming with prefetch depth 2 \(3 slots of 500 B"):
        plan_tiers(compressed, dense, prefetch_depth=2, device_budget_bytes=1499)


def test_budget_parsing():
    assert parse_budget("8GiB", "x") == (8 * 2**30, None)
    assert parse_budget("500MB", "x") == (500 * 10**6, None)
    assert parse_budget("12", "x") == (None, 12)
    assert parse_budget(3, "x") == (None, 3)
    for bad in ("lots", "1.5", "-3", "12 parsecs"):
        with pytest.raises(ConfigError):
            parse_budget(bad, "GPU memory")


def test_check_prompt(smollm2_dir):
    from transformers import AutoTokenizer

    import pickle

    from endor_ray.engine.prompts import PromptTooLong, check_prompt, context_limit

    assert context_limit({"max_position_embeddings": 4096}) == 4096
    assert context_limit({"max_position_embeddings": 4096, "sliding_window": 1024}) == 1024
    assert context_limit({"max_position_embeddings": 4096, "sliding_window": 1024, "use_sliding_window": False}) == 4096
    assert context_limit({"max_position_embeddings": 4096, "sliding_window": None}) == 4096
    assert context_limit({}) == 2**31
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    expected = tokenizer("The capital of France is").input_ids
    assert check_prompt(tokenizer, "The capital of France is", 8, 64) == expected
    assert check_prompt(tokenizer, expected, 64 - len(expected), 64) == expected  # ids as given, up to the edge
    with pytest.raises(ConfigError, match="non-empty"):
        check_prompt(tokenizer, "", 8, 64)
    with pytest.raises(ConfigError, match="tokenizes to no tokens"):
        check_prompt(tokenizer, [], 8, 64)
    with pytest.raises(ConfigError, match=r"token ids must be in \[0, "):
        check_prompt(tokenizer, [len(tokenizer)], 8, 64)
    with pytest.raises(PromptTooLong, match="exceeds the model's context of 64 tokens") as too_long:
        check_prompt(tokenizer, expected, 65 - len(expected), 64)
    assert (too_long.value.prompt_tokens, too_long.value.max_new_tokens) == (len(expected), 65 - len(expected))
    copied = pickle.loads(pickle.dumps(too_long.value))  # how it crosses Ray
    assert str(copied) == str(too_long.value) and copied.max_context == 64


def test_bad_input(tiny_stores, tmp_path):
    store = str(tiny_stores["llama-gqa"])
    with Engine(store, EngineConfig(gpu_memory=0), progress=False) as engine:
        with pytest.raises(ConfigError, match="no prompts"):
            engine.generate([])
        with pytest.raises(ConfigError, match="non-empty"):
            engine.generate([""])
        with pytest.raises(ConfigError, match="exceeds the model's context of 128 tokens"):
            engine.generate(["word " * 200])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=-1)
    with pytest.raises(ConfigError, match="GPU memory budget .* below the minimum"):
        Engine(store, EngineConfig(device="cpu", gpu_memory="1KB"), progress=False)
    with pytest.raises(ConfigError, match="neither a layer count"):
        EngineConfig(gpu_memory="a lot")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            Engine(store, EngineConfig(device="cuda"), progress=False)
    old = shutil.copytree(store, tmp_path / "old")
    manifest = read_manifest(old)
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format version 0"):
        Engine(str(old), progress=False)


def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("endor-read", "endor-transfer")) and t.is_alive()]


def test_interrupt_leaves_no_threads_and_engine_recovers(tiny_stores):
    from endor_ray.models.skeleton import decoder_layers

    params = SamplingParams(max_new_tokens=8)
    with Engine(str(tiny_stores["opt"]), EngineConfig(gpu_memory=0, prefetch_depth=2), progress=False) as engine:
        expected, _ = engine.generate(PROMPTS[:2], params)
        calls = []

        def ctrl_c_in_second_pass(module, args, kwargs):  # as if Ctrl-C arrived mid-pass
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt

        middle = decoder_layers(engine.model, engine.store.architecture)[1]
        handle = middle.register_forward_pre_hook(ctrl_c_in_second_pass, with_kwargs=True)
        with pytest.raises(KeyboardInterrupt):
            engine.generate(PROMPTS[:2], params)
        handle.remove()
        again, _ = engine.generate(PROMPTS[:2], params)  # the broken pass's prefetches are dropped
        assert [c.token_ids for c in again] == [c.token_ids for c in expected]
    assert io_threads() == []


def test_sampling_is_seeded_and_top_p_limits(tiny_stores):
    with Engine(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=2), progress=False) as engine:
        greedy, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
        sampled = SamplingParams(max_new_tokens=6, temperature=1.5, seed=7)
        first, _ = engine.generate(PROMPTS, sampled)
        second, _ = engine.generate(PROMPTS, sampled)
        narrow, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=1))
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert [c.token_ids for c in first] != [c.token_ids for c in greedy]
    assert [c.token_ids for c in narrow] == [c.token_ids for c in greedy]  # only the top token survives


@pytest.mark.slow
def test_streaming_text_and_stop_strings(smollm2_store):
    with Engine(str(smollm2_store), EngineConfig(gpu_memory=30), progress=False) as engine:
        plain, _ = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=12))
        text = plain[0].text
        stop = text.strip().split()[2]  # a word from the middle of the greedy answer
        pieces = []
        stopped, stats = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=12, stop=(stop,)),
                                         on_token=lambda index, token, delta: pieces.append(delta))
    assert stopped[0].finish_reason == "stop"
    assert stop not in stopped[0].text and text.startswith(stopped[0].text)
    assert "".join(pieces) == stopped[0].text
    assert stats.source.hits["device"] == stats.passes * 30  # everything resident: nothing streams


def test_a_failed_layer_read_is_retried_by_the_next_request(tiny_stores):
    from endor_ray.engine.readers import StoreReader

    class FlakyReader(StoreReader):
        """Fails the first read of the last layer, as a hiccup of a disk or shard server would."""

        failures_left = 1

        def resolve(self, request, buffer):
            if request == 2 and self.failures_left:
                self.failures_left -= 1
                raise OSError("transient read error")
            return super().resolve(request, buffer)

    store = str(tiny_stores["llama-gqa"])
    with Engine(store, EngineConfig(gpu_memory=0, prefetch_depth=2), progress=False) as reference:
        expected = reference.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4)).completions
    from endor_ray.store import Store

    opened = Store(store)
    with Engine(opened, EngineConfig(gpu_memory=0, prefetch_depth=2), progress=False,
                reader=FlakyReader(opened, ())) as engine:
        with pytest.raises(OSError, match="transient"):
            engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4))
        again = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4)).completions
    assert [c.token_ids for c in again] == [c.token_ids for c in expected]


def test_a_failure_after_the_layer_source_started_leaks_no_threads(tiny_stores, monkeypatch):
    def broken_hooks(self):
        raise RuntimeError("hooks could not be installed")

    from endor_ray.engine.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "_install_hooks", broken_hooks)
    with pytest.raises(RuntimeError, match="hooks"):
        Engine(str(tiny_stores["opt"]), EngineConfig(gpu_memory=0), progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith(("endor-read", "endor-transfer"))]
