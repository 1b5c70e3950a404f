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
    from endor_ray.compress.default_model import default_model_dir

    return default_model_dir()


def read_manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory, smollm2_dir) -> dict:
    """Random-weight OPT and GQA-Llama stores (magnitude, 50%) carrying SmolLM2's tokenizer."""
    from endor_ray.compress.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("tiny-stores")
    stores = {}
    for family in ("opt", "llama-gqa"):
        checkpoint = make_checkpoint(root / f"{family}-ckpt", family, vocab_size=49152)
        for path in smollm2_dir.iterdir():
            if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
                shutil.copy(path, checkpoint / path.name)
        stores[family] = convert(str(checkpoint), root / family,
                                 ConvertConfig(method="magnitude", block_size=256), progress=False)
    return stores


@pytest.fixture(scope="session")
def smollm2_store(smollm2_dir, tmp_path_factory):
    """SmolLM2 pruned to 50% by magnitude, fp32."""
    from endor_ray.compress.convert import ConvertConfig, convert

    return convert(str(smollm2_dir), tmp_path_factory.mktemp("smollm2-store") / "store",
                   ConvertConfig(method="magnitude"), progress=False)
