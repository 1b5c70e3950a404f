"""The store's manifest: its schema, its own checksum, and what each tensor's checksum covers.

A manifest is checked in this order when a store is opened:

1. `format_version` is one this endor-ray reads (so a newer store says so, whatever else changed);
2. (version 2) ``checksum`` is ``"sha256:<hex>"`` of the manifest's canonical JSON without the
   ``checksum`` key (keys sorted, no spaces, UTF-8): a manifest edited after it was written, by
   hand or by damage, is refused;
3. the schema (`Manifest` below): every field present, of its type and range (one-line errors
   naming the field), no extra fields inside entries;
4. the architecture's layer count, and file names that stay inside the store;
5. the model config's sizes (`check_model_config`): each one present a positive integer below
   2**31 (a zero head count or a negative context fails here, in one line, not deep inside
   transformers). What only transformers can judge (an activation's name, a rope type) and
   whether the config fits the tensors are `endor inspect --verify`'s (`endor_ray.store.audit`).

Version 2 also lists each tokenizer file with its SHA-256. Its tensor checksums cover what the
tensor *is*: its ``crc32`` is CRC-32 over
`tensor_header` (the file it lives in, its layer, its position in the file, name, shape, dtype, layout,
values encoding, block size, nnz; canonical JSON) followed by its parts' bytes. Swapping two
tensors' names, two layers' entries, or a shape for its transpose breaks it. Version 1 checksums
cover the bytes only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from endor_ray.errors import StoreError
from endor_ray.format.tensor import PART_ORDER, VALUES_ENCODINGS

CHECKSUM_KEY = "checksum"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Count = Annotated[int, Field(ge=0)]


class TensorEntry(_Strict):
    name: str = Field(min_length=1)
    shape: list[Count] = Field(max_length=8)
    dtype: Literal["float16", "bfloat16", "float32"]
    layout: Literal["bitmap", "dense"]
    values_encoding: Literal[VALUES_ENCODINGS]  # "raw", "int8", "int4" or a GGUF block type ("q4_1", ...)
    block_size: int = Field(ge=1)
    nnz: int = Field(ge=0)
    group_size: int | None = Field(default=None, ge=1)  # int8/int4 only
    crc32: int = Field(ge=0, lt=2**32)
    parts: dict[Literal[PART_ORDER], Annotated[list[Count], Field(min_length=2, max_length=2)]]


class FileEntry(_Strict):
    file: str
    nbytes: int = Field(ge=0)
    tensors: list[TensorEntry]


class ExpertEntry(FileEntry):
    expert: int = Field(ge=0)


class LayerEntry(FileEntry):
    index: int = Field(ge=0)
    experts: list[ExpertEntry] = []  # an MoE layer's experts, one file each (`endor_ray.models.moe`)


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model_type: str
    dtype: Literal["float16", "bfloat16", "float32"]
    config: dict[str, Any]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    format: Literal["endor-ray store"]
    format_version: int
    model: ModelInfo
    compression: dict[str, Any]
    tokenizer_files: list[str] | dict[str, str] = []  # version 2: name -> SHA-256 of the file
    dense: FileEntry
    layers: list[LayerEntry]


def canonical(manifest: dict[str, Any]) -> bytes:
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its checksum set (the last thing a writer does)."""
    return {**manifest, CHECKSUM_KEY: "sha256:" + hashlib.sha256(canonical(manifest)).hexdigest()}


def check(manifest: Any, where: str, readable_versions: tuple[int, ...]) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; StoreError (one line, the field named) on any failure."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} is malformed: a JSON object is expected, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version not in readable_versions:
        raise StoreError(f"{where} has store format version {version}; this endor-ray reads versions "
                         f"{', '.join(map(str, readable_versions))}: convert the model again with this version")
    if version >= 2:
        expected = "sha256:" + hashlib.sha256(canonical(manifest)).hexdigest()
        if manifest.get(CHECKSUM_KEY) != expected:
            raise StoreError(f"{where} does not match its checksum: it was changed after endor convert wrote "
                             "it (edited or damaged); re-run endor convert")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise StoreError(f"{where} is malformed: {field}: {error['msg']} ({exc.error_count()} problem(s) in all); "
                         "re-run endor convert") from None
    return manifest


def tensor_header(file_name: str, layer_idx: int | None, position: int, entry: dict[str, Any]) -> bytes:
    """What a version-2 tensor checksum covers besides the bytes: identity and metadata
    (`layer_idx` None for the non-layer file)."""
    fields = {key: entry[key] for key in ("name", "shape", "dtype", "layout", "values_encoding", "block_size", "nnz")}
    if "group_size" in entry:  # int8/int4 tensors (version 3)
        fields["group_size"] = entry["group_size"]
    return json.dumps({"file": file_name, "layer": layer_idx, "position": position, **fields}, sort_keys=True,
                      separators=(",", ":")).encode()


# Sizes a decoder config may give (each architecture uses some): each must be a positive int.
CONFIG_SIZES = ("hidden_size", "intermediate_size", "ffn_dim", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "vocab_size", "max_position_embeddings", "head_dim", "word_embed_proj_dim")


def check_model_config(config: dict[str, Any], where: str) -> None:
    """Step 5 of the module docstring; StoreError naming the field."""
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31):
            raise StoreError(f"{where} is malformed: model.config.{key} is {str(value)[:40]!r}, not a positive "
                             "integer below 2**31; re-run endor convert")
