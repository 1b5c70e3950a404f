"""Shared fixtures. Environment first, before anything imports Triton or Ray:

- Triton kernels run under the interpreter when there is no GPU (the variable must be set before
  any @triton.jit decorator runs);
- every Ray cluster a test starts lives on 127.0.0.1 with token authentication off. Ray reads
  the auth mode once per process: set later, after some test has imported Ray, a driver would
  wait forever on a cluster started with the other mode. (Real clusters keep token auth on.)
"""

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # without it a loopback cluster hangs
os.environ["RAY_AUTH_MODE"] = "disabled"

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tiny random-weight configs, one per supported family (built offline in milliseconds).
TINY_CONFIGS = {
    "llama-gqa": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        max_position_embeddings=128, tie_word_embeddings=False,
    ),
    "opt": dict(
        model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, ffn_dim=160,
        num_hidden_layers=3, num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
        word_embed_proj_dim=64,
    ),
    "mistral": dict(
        model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        max_position_embeddings=128,
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
        max_position_embeddings=128,
    ),
}


def make_checkpoint(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight HF checkpoint of `family` (float32) into `directory`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(root / family, family) for family in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model as an HF folder (prepared once, cached across runs)."""
    import fcntl

    from endor_ray.compress.default_model import cache_dir, default_model_dir

    # Two xdist workers of a fresh machine would both prepare it, one replacing the folder the
    # other reads: the second waits for the first and finds it cached.
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".tests-prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return default_model_dir()


def read_manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tokenized_checkpoints(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """Random-weight OPT and GQA-Llama checkpoints at SmolLM2's vocabulary, carrying its tokenizer
    (read-only: a test that changes one copies it first)."""
    root = tmp_path_factory.mktemp("tokenized-checkpoints")
    checkpoints = {}
    for family in ("opt", "llama-gqa"):
        checkpoint = make_checkpoint(root / family, family, vocab_size=49152)
        for path in smollm2_dir.iterdir():
            if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(path, checkpoint / path.name)
        checkpoints[family] = checkpoint
    return checkpoints


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory, tokenized_checkpoints) -> dict:
    """Random-weight OPT and GQA-Llama stores (magnitude, 50%) carrying SmolLM2's tokenizer."""
    from endor_ray.compress.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("tiny-stores")
    return {family: convert(str(checkpoint), root / family, ConvertConfig(method="magnitude", block_size=256),
                            progress=False)
            for family, checkpoint in tokenized_checkpoints.items()}


@pytest.fixture(scope="session")
def smollm2_store(smollm2_dir, tmp_path_factory):
    """SmolLM2 pruned to 50% by magnitude, fp32 (read-only: test_smollm2.py uses it as its magnitude store)."""
    from endor_ray.compress.convert import ConvertConfig, convert

    return convert(str(smollm2_dir), tmp_path_factory.mktemp("smollm2-store") / "store",
                   ConvertConfig(method="magnitude"), progress=False)


# --- pytest-xdist: `make test-parallel` (-n 2 --dist loadgroup), one worker per core ----------------
# A worker runs whole groups: a file (its module-scoped servers, clusters and stores are built
# once), or the tests that share an expensive session fixture (one SmolLM2 store per run, not one
# per worker). Groups are handed out in collection order, so the longest go first (rough seconds on
# the idle 2-core machine, from the last full runs' durations) and the two workers finish together. (xdist's own
# xdist_group marks do nothing under pytest 9: xdist 3.8 renames the node ids through an attribute
# pytest no longer reads; so the scheduler below groups by node id itself.)
SMOLLM2_STORE_TESTS = (  # the users of the smollm2_store fixture (a test missing here builds its own copy)
    "tests/test_smollm2.py::", "tests/test_engine.py::test_smollm2_matches_transformers",
    "tests/test_engine.py::test_streaming_text_and_stop_strings", "tests/test_readme.py::test_examples_run_as_documented",
)
OWN_GROUPS = {  # tests that use none of their file's module-scoped fixtures: free to run elsewhere
    "tests/test_jobs.py::test_kill_9_at_random_moments_loses_and_duplicates_nothing": "test_jobs.py-kill-9",
}
GROUP_SECONDS = {
    "test_jobs.py": 300, "smollm2_store": 280, "test_jobs.py-kill-9": 220, "test_hardening_serve.py": 200,
    "test_gguf_import.py": 180, "test_readme.py": 150, "test_gguf_blocks.py": 150, "test_serve.py": 140,
    "test_families.py": 120, "test_cluster_configs.py": 100, "test_quantized_stores.py": 90,
    "test_structured_output.py": 80, "test_tools.py": 80, "test_gpu_check.py": 60, "test_jobs_checks.py": 60,
    "test_cli.py": 50, "test_gguf_kernel_aot.py": 40, "test_kernel_aot.py": 40, "test_service.py": 40,
    "test_moe_service.py": 130,
}


def xdist_group(nodeid: str) -> str:
    """The group the test `nodeid` runs in under xdist (see above)."""
    name = nodeid.split("[", 1)[0]
    if name in OWN_GROUPS:
        return OWN_GROUPS[name]
    if name.startswith(SMOLLM2_STORE_TESTS):
        return "smollm2_store"
    return name.split("::", 1)[0].rsplit("/", 1)[-1]


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: without xdist installed, never called
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the longest groups first (stable: file order kept)
        items.sort(key=lambda item: -GROUP_SECONDS.get(xdist_group(item.nodeid), 10))
