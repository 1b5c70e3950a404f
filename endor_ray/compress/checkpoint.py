"""Reading a local Hugging Face checkpoint directory lazily, one tensor at a time.

`TensorSource` is what the converter reads from: a config, its architecture, tensor names, one
tensor at a time and the tokenizer files. `Checkpoint` is the Hugging Face folder;
`endor_ray.compress.gguf_source.GGUFSource` a GGUF file, which can also hand out its own blocks.

Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or (only
through ``torch.load(weights_only=True, mmap=True)``) ``pytorch_model.bin`` and its shards. Nothing
is read before it is asked for, so a checkpoint larger than RAM can be converted layer by layer.
gpt-oss's release checkpoints hold their experts in MXFP4 (`endor_ray.compress.mxfp4`): they are
read as the float tensors transformers' module holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from endor_ray.models.architecture import Architecture, architecture_from_config
from endor_ray.errors import StoreError, UnsupportedModelError

if TYPE_CHECKING:
    from endor_ray.compress.gguf_source import Blocks

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def read_config(directory: Path) -> dict[str, Any]:
    """config.json as a dict; StoreError if it is missing or not a JSON object."""
    path = directory / "config.json"
    if not path.is_file():
        raise StoreError(f"{path} not found: is {directory} a Hugging Face checkpoint directory?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); check the file") from exc
    if not isinstance(config, dict):
        raise StoreError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


class TensorSource:
    """A model's tensors by Hugging Face name, read one at a time; `directory` holds config.json and
    the tokenizer files. Subclasses give the names, shapes and tensors."""

    directory: Path
    config: dict[str, Any]
    architecture: Architecture

    @property
    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """One tensor as floats, read from disk now."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """One tensor's shape (nothing is read)."""
        raise NotImplementedError

    def blocks(self, name: str) -> Blocks | None:
        """The tensor's own quantized blocks where the source holds them (a GGUF file), else None."""
        return None

    def layer_names(self) -> dict[int, list[str]]:
        """layer index -> full tensor names of that layer; every layer must have tensors."""
        names: dict[int, list[str]] = {idx: [] for idx in range(self.architecture.num_layers)}
        for name in self.tensor_names:
            layer_idx, _ = self.architecture.split_name(name)
            if layer_idx is not None:
                names[layer_idx].append(name)
        empty = [idx for idx, layer in names.items() if not layer]
        if empty:
            raise UnsupportedModelError(
                f"layers {empty[:5]} have no tensors under {self.architecture.layer_prefix!r} "
                f"in {self.directory}; is the checkpoint complete?"
            )
        return names

    def layer_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes all decoder layers take in `dtype` (from the shapes: nothing is read)."""
        numel = sum(math.prod(self.shape(name)) for names in self.layer_names().values() for name in names)
        return numel * dtype.itemsize

    def dense_names(self) -> list[str]:
        """Names of the tensors outside the decoder layers (embeddings, final norm, LM head)."""
        return [name for name in self.tensor_names if self.architecture.split_name(name)[0] is None]

    def tokenizer_files(self) -> list[Path]:
        return [self._inside(self.directory / name) for name in TOKENIZER_FILES if (self.directory / name).is_file()]

    def _inside(self, path: Path) -> Path:
        """`path` if it (its link target included) lies inside `directory`; a Hugging Face hub
        snapshot may link into its repository's cache folder (snapshots/REV/x -> ../../blobs/y)."""
        real = path.resolve()
        roots = [self.directory.resolve()]
        if self.directory.resolve().parent.name == "snapshots":
            roots.append(self.directory.resolve().parent.parent)
        if not any(real == root or root in real.parents for root in roots):
            raise StoreError(f"{path} points outside the checkpoint {self.directory} (to {real}); refusing to read it")
        return path


class Checkpoint(TensorSource):
    """A local HF checkpoint: its config, architecture, tensor names and lazily loaded tensors."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise StoreError(f"checkpoint directory {self.directory} does not exist")
        self.config = read_config(self.directory)
        self.architecture: Architecture = architecture_from_config(self.config)
        self._open_files: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = self._index_tensors()
        self._mxfp4: dict[str, tuple[str, str]] = {}  # tensor name -> (blocks, scales) of MXFP4 experts
        if (self.config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            self._read_mxfp4()

    def _read_mxfp4(self) -> None:
        """gpt-oss's release checkpoints: MXFP4 experts (`endor_ray.compress.mxfp4`), read as the
        float tensors a bf16 checkpoint holds; the store's config then names no quantization."""
        from endor_ray.compress.mxfp4 import mxfp4_pairs

        if self.config.get("model_type") != "gpt_oss":
            raise UnsupportedModelError(f"{self.directory}: MXFP4 weights are read for gpt-oss checkpoints only, "
                                        f"not {self.config.get('model_type')!r}")
        self._mxfp4 = mxfp4_pairs(list(self._file_of))
        if not self._mxfp4:
            raise StoreError(f"{self.directory}/config.json names MXFP4 quantization but no tensor has the "
                             "_blocks and _scales pair it implies; is the checkpoint complete?")
        self.config = {key: value for key, value in self.config.items() if key != "quantization_config"}

    def _index_tensors(self) -> dict[str, Path]:
        """tensor name -> file holding it, from the safetensors/bin files or their index."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.directory / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise StoreError(f"{index_path} is malformed ({exc})") from exc
                return {name: self._inside(self.directory / file) for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = self.directory / single
            if path.is_file():
                path = self._inside(path)
                return {name: path for name in self._names_in(path)}
        raise StoreError(
            f"no weights in {self.directory}: expected model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin"
        )

    def _names_in(self, path: Path) -> list[str]:
        return list(self._open(path).keys())

    def _open(self, path: Path) -> Any:
        if path not in self._open_files:
            if not path.is_file():
                raise StoreError(f"weight file {path} listed in the index does not exist")
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open_files[path] = safe_open(str(path), framework="pt")
                else:
                    self._open_files[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # safetensors/pickle raise assorted types for a damaged file
                raise StoreError(f"cannot read weight file {path}: {exc}") from exc
        return self._open_files[path]

    @property
    def tensor_names(self) -> list[str]:
        packed = {part for pair in self._mxfp4.values() for part in pair}
        return [name for name in self._file_of if name not in packed] + list(self._mxfp4)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now."""
        if name in self._mxfp4:
            from endor_ray.compress.mxfp4 import gpt_oss_expert_tensor

            blocks, scales = (self._read(part) for part in self._mxfp4[name])
            try:
                return gpt_oss_expert_tensor(blocks, scales)
            except ValueError as exc:
                raise StoreError(f"{self.directory}: {name}: {exc}") from None
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        handle = self._open(self._file_of[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._mxfp4:
            from endor_ray.compress.mxfp4 import expert_shape

            return expert_shape(self._shape(self._mxfp4[name][0]))
        return self._shape(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._file_of[name])
        return tuple(handle.get_slice(name).get_shape() if hasattr(handle, "get_slice") else handle[name].shape)
