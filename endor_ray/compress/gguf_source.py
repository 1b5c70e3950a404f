"""Reading a llama-family GGUF file lazily: Hugging Face names, llama.cpp's q/k row order undone, blocks kept.

A GGUF file (llama.cpp's format) holds each tensor in a ggml type: float (F32, F16, BF16) or
quantized blocks (Q4_1: 20 bytes per 32 weights). `GGUFSource` reads one through gguf-py's
memory-mapped `GGUFReader` (nothing is read before it is asked for) and offers what a Hugging Face
checkpoint offers (`endor_ray.compress.checkpoint.TensorSource`), plus `blocks(name)`: a tensor's
own block bytes, which the converter stores as they are (`kept_tensors`: `endor convert` of a GGUF
without re-compression).

- Names: ``blk.N.attn_q.weight`` is ``model.layers.N.self_attn.q_proj.weight`` and so on
  (`LAYER_NAMES`, `DENSE_NAMES`); ``rope_freqs.weight`` (llama 3's rotary table, which
  transformers derives from the config) is skipped; any other name is refused.
- Shapes: GGUF lists dimensions innermost first (ne0 = columns); the HF shape is the reverse. The
  blocks of a [rows, cols] tensor are ``uint8[rows, cols // block_elems * type_size]``, row by row.
- Row order: llama.cpp's convert_hf_to_gguf.py reorders the rows of q_proj and k_proj of a
  ``llama`` model within each head (the two rotary halves interleaved): viewed as
  [heads, 2, rows / heads / 2], HF row (h, i, j) is GGUF row (h, j, i). `hf_row_order` undoes it.
  A block never spans two rows, so on blocks this moves whole rows of bytes, each left untouched.
- Config and tokenizer: ``directory`` holds config.json and the tokenizer files. The caller may
  give one (the embedded model's cached folder); otherwise transformers builds both from the
  GGUF's metadata (``from_pretrained(folder, gguf_file=...)``) into a temporary folder.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from endor_ray.compress.checkpoint import TensorSource, read_config
from endor_ray.errors import StoreError, UnsupportedModelError
from endor_ray.format.gguf_blocks import GGUF_ENCODINGS, block_type
from endor_ray.format.tensor import DEFAULT_BLOCK_SIZE, EncodedTensor, gguf_tensor
from endor_ray.models.architecture import architecture_from_config

# GGUF name within a block -> HF name within a decoder layer.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
DENSE_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SKIPPED_NAMES = ("rope_freqs.weight",)
PERMUTED_ARCHITECTURES = ("llama",)  # whose q/k rows convert_hf_to_gguf.py reorders
GGUF_ARCHITECTURES = ("llama", "qwen2")  # general.architecture values read here (mistral files say llama)


@dataclass(frozen=True)
class Blocks:
    """One tensor's own quantized blocks, rows in Hugging Face order."""

    encoding: str  # the ggml type, lower case: "q4_1"
    shape: tuple[int, int]  # (rows, cols) of the HF weight
    data: torch.Tensor  # [rows, bytes_per_row] uint8


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.ffn_up.weight' -> 'model.layers.3.mlp.up_proj.weight'; None for a skipped tensor."""
    if gguf_name in SKIPPED_NAMES:
        return None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(1) in DENSE_NAMES:
        return f"{DENSE_NAMES[match.group(1)]}.{match.group(2)}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known here; "
                                f"supported: blk.N.{{{','.join(LAYER_NAMES)}}} and {', '.join(DENSE_NAMES)}")


def hf_row_order(rows: int, num_heads: int) -> torch.Tensor:
    """[rows] int64: HF row r is GGUF row order[r] (undoes convert_hf_to_gguf.py's permute)."""
    if rows % (2 * num_heads):
        raise UnsupportedModelError(f"a q/k weight of {rows} rows does not split into {num_heads} heads of two halves")
    return torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2).reshape(-1)


class GGUFSource(TensorSource):
    """A GGUF file's tensors under Hugging Face names; `directory` holds its config and tokenizer."""

    def __init__(self, path: str | Path, directory: str | Path | None = None):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except (OSError, ValueError, IndexError) as exc:  # gguf-py's words for a bad magic or a short file
            raise StoreError(f"cannot read {self.path} as a GGUF file: {exc}") from exc
        self.gguf_architecture = str(self._field("general.architecture"))
        if self.gguf_architecture not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(f"GGUF architecture {self.gguf_architecture!r} is not supported; "
                                        f"supported: {', '.join(GGUF_ARCHITECTURES)}")
        self._temporary = None
        if directory is None:  # kept alive with this object; removed when it is collected
            self._temporary = tempfile.TemporaryDirectory(prefix="endor-gguf-")
            directory = write_metadata(self.path, Path(self._temporary.name))
        self.directory = Path(directory)
        self.config = read_config(self.directory)
        self.architecture = architecture_from_config(self.config)
        self._tensors = {}
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        heads = int(self._field(f"{self.gguf_architecture}.attention.head_count"))
        kv_heads = self._field(f"{self.gguf_architecture}.attention.head_count_kv")
        self._heads = {"q_proj": heads, "k_proj": int(kv_heads) if kv_heads is not None else heads}

    def _field(self, key: str) -> Any:
        field = self._reader.get_field(key)
        return None if field is None else field.contents()

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(dim) for dim in reversed(self._tensors[name].shape))

    def gguf_type(self, name: str) -> str:
        """The tensor's ggml type, lower case ('q4_1', 'f32')."""
        return self._tensors[name].tensor_type.name.lower()

    def get(self, name: str) -> torch.Tensor:
        """The tensor de-quantized by gguf-py (float32; a float tensor as stored), rows in HF order."""
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        values = np.array(dequantize(tensor.data, tensor.tensor_type)).reshape(self.shape(name))
        return self._hf_rows(name, torch.from_numpy(values))

    def blocks(self, name: str) -> Blocks | None:
        """The 2-D tensor's blocks as stored (rows in HF order), or None for a float type."""
        from gguf import GGML_QUANT_SIZES

        tensor = self._tensors[name]
        shape = self.shape(name)
        block_elems, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        if block_elems == 1 or len(shape) != 2:  # a float (or integer) type: one element per "block"
            return None
        rows, cols = shape
        if cols % block_elems:
            raise StoreError(f"{self.path}: {name} has {cols} columns, not a multiple of its "
                             f"{self.gguf_type(name)} blocks of {block_elems}: the file is damaged")
        data = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(rows, cols // block_elems * type_size))
        return Blocks(self.gguf_type(name), (rows, cols), self._hf_rows(name, data))

    def _hf_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """`rows` ([rows, ...]) in HF order: llama's q/k rows are un-permuted, anything else is as given."""
        projection = name.split(".")[-2]
        if self.gguf_architecture not in PERMUTED_ARCHITECTURES or projection not in self._heads:
            return rows
        return rows[hf_row_order(rows.shape[0], self._heads[projection])]


def write_metadata(path: Path, directory: Path) -> Path:
    """config.json, generation_config.json and the tokenizer files for GGUF `path`, built by
    transformers from the file's metadata, into `directory` (nothing is de-quantized)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as exc:  # transformers' words for an architecture it cannot map
        raise UnsupportedModelError(f"transformers cannot read the config or tokenizer of {path}: {exc}") from exc
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def kept_tensors(source: TensorSource, names: list[str], dtype: torch.dtype,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, EncodedTensor]:
    """The tensors among `names` (full names, one layer's) stored as the source's own blocks, by name
    within the layer: 2-D weights of a type the format holds, whose rows are whole blocks."""
    kept = {}
    for full_name in names:
        blocks = source.blocks(full_name)
        if blocks is None or blocks.encoding not in GGUF_ENCODINGS:
            continue
        if blocks.shape[1] % block_type(blocks.encoding).block_elems:
            continue
        name = source.architecture.split_name(full_name)[1]
        kept[name] = gguf_tensor(blocks.data, blocks.encoding, blocks.shape, dtype, block_size)
    return kept
