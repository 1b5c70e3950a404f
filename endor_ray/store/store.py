"""The compressed model store: where Endor-encoded layers live on disk or in object storage.

Layout of a store (format version 3; version 2 lacks quantized values, version 1 also differs in
part alignment, below)::

    STORE/manifest.json                    written last: a store without it is incomplete
    STORE/tokenizer/...                    the source checkpoint's tokenizer files
    STORE/dense.safetensors                non-layer weights (embeddings, final norm, LM head), dense
    STORE/layers/layer-00000.safetensors   one file per decoder layer, holding all its tensors' parts
    STORE/layers/layer-00000-expert-00003.safetensors   an MoE layer's experts, one file each

Each tensor file is a valid safetensors file whose keys are ``"<tensor name>/<part>"`` with part
one of ``bitmap``, ``block_offsets``, ``row_offsets``, ``scales``, ``values`` (see
`endor_ray.format`; quantized tensors have the middle two), so a whole layer is
one sequential read and can be memory-mapped. In version 2 every part starts at a multiple of
``PART_ALIGNMENT`` (64) bytes from the start of the file: the header is padded with spaces (as
safetensors allows) and ``uint8`` tensors named ``"__pad__/<n>"`` fill the gaps between parts
(safetensors allows no holes). A file read into a 64-byte aligned buffer therefore hands the
GPU kernel and the CPU decoder aligned arrays (wide loads, one kernel specialisation). Version 1
files (parts wherever safetensors put them) are read the same way: readers only ever use the
byte ranges in the manifest. The manifest holds the model config and, per file, its byte size
and one entry per tensor::

    {"name": "self_attn.q_proj.weight", "shape": [576, 576], "dtype": "float32",
     "layout": "bitmap", "values_encoding": "raw", "block_size": 4096, "nnz": 165888,
     "crc32": 2611475423, "parts": {"bitmap": [BEGIN, END], "block_offsets": [...], "values": [...]}}

where BEGIN/END are absolute byte offsets in the file. A quantized tensor (version 3) has
``"values_encoding": "int8"`` or ``"int4"``, a ``"group_size"`` and the parts ``scales`` (and
``row_offsets`` in layout ``bitmap``). A tensor of llama.cpp blocks (tensor format version 3,
`endor_ray.format.gguf_blocks`) has ``"values_encoding"`` one of `GGUF_ENCODINGS` (``"q8_0"`` ...
``"iq4_nl"``), layout ``dense``, ``nnz`` = its element count, no ``"group_size"`` and the one
part ``values``; the manifest's fields are those of every version-3 store, so an endor-ray that
predates these encodings refuses such a tensor by name ("values encoding 'q4_1' is not
supported"). Readers take local paths and any URI ``pyarrow.fs`` understands (``file://``,
``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from endor_ray.models.architecture import Architecture, architecture_from_config
from endor_ray.store import files
from endor_ray.errors import ChecksumError, FormatError, StoreError
from endor_ray.format.tensor import (
    EncodedTensor, checksum, crc32, dtype_from_name, dtype_name, tensor_bytes, validate, validate_contents,
)
from endor_ray.format.verify import check_counts
from endor_ray.store.manifest import check as check_manifest, check_model_config, tensor_header

STORE_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
PART_ALIGNMENT = 64  # bytes; version 2 starts every part of a tensor file at a multiple of it
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 256 << 20  # a 1000-layer model's manifest is a few MB: more is not a manifest
MAX_TOKENIZER_FILE_BYTES = 1 << 30  # tokenizer files are MBs; no size from the manifest proves them
DENSE_FILE = "dense.safetensors"
TOKENIZER_DIR = "tokenizer"


def layer_file_name(layer_idx: int) -> str:
    return f"layers/layer-{layer_idx:05d}.safetensors"


def expert_file_name(layer_idx: int, expert_idx: int) -> str:
    """One expert of an MoE layer: its own file, so it is read (and served) alone."""
    return f"layers/layer-{layer_idx:05d}-expert-{expert_idx:05d}.safetensors"


# -- writing (always to a local directory) -------------------------------------------------------


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float32: "F32"}


def write_tensor_file(path: Path, tensors: dict[str, EncodedTensor], file_name: str,
                      layer_idx: int | None = None) -> dict[str, Any]:
    """Write `tensors` into one safetensors file with every part aligned to PART_ALIGNMENT bytes;
    return its manifest entry. `file_name` (its name in the store) and `layer_idx` (None: the
    non-layer file) are covered by its tensors' checksums."""
    parts = [(f"{name}/{part}", data.detach().contiguous().cpu().view(-1))
             for name, enc in tensors.items() for part, data in enc.parts().items()]
    header: dict[str, Any] = {}
    layout: list[tuple[str, torch.Tensor | int]] = []  # what goes into the data section, in order
    offset = 0
    for key, data in parts:
        gap = -offset % PART_ALIGNMENT  # relative to the data start, itself aligned below
        if gap:
            layout.append((f"__pad__/{len(layout)}", gap))
            header[layout[-1][0]] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            offset += gap
        nbytes = data.numel() * data.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[data.dtype], "shape": [data.numel()],
                       "data_offsets": [offset, offset + nbytes]}
        layout.append((key, data))
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % PART_ALIGNMENT)  # data starts aligned
    data_start = 8 + len(header_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for _, data in layout:
            f.write(bytes(data) if isinstance(data, int) else tensor_bytes(data))
    entries = []
    for position, (name, enc) in enumerate(tensors.items()):
        ranges = {part: [data_start + begin, data_start + end] for part in enc.parts()
                  for begin, end in [header[f"{name}/{part}"]["data_offsets"]]}
        entry = {"name": name, "shape": list(enc.shape), "dtype": dtype_name(enc.dtype), "layout": enc.layout,
                 "values_encoding": enc.values_encoding, "block_size": enc.block_size, "nnz": enc.nnz}
        if enc.quantized and not enc.gguf:  # GGUF blocks carry their own block size
            entry["group_size"] = enc.group_size
        entry["crc32"] = checksum(enc, crc32(tensor_header(file_name, layer_idx, position, entry)))
        entries.append({**entry, "parts": ranges})
    located = {"index": layer_idx} if layer_idx is not None else {}
    return {**located, "file": file_name, "nbytes": data_start + offset, "tensors": entries}


# -- reading --------------------------------------------------------------------------------------


def tensors_from_buffer(
    buffer: torch.Tensor, file_entry: dict[str, Any], verify: bool = True, version: int = STORE_FORMAT_VERSION,
) -> dict[str, EncodedTensor]:
    """The EncodedTensors of one file, as views into `buffer` ([file nbytes] uint8, any device).

    With verify (CPU buffers only) each tensor's CRC-32 (version 2: metadata and position too)
    and its block offsets are checked (monotone, each block's count equal to its bitmap's set
    bits), so a kernel given these arrays never reads outside the values; without, only sizes
    are, and nothing is read, so a GPU copy of a verified file is never synchronised on.
    """
    file_name = file_entry["file"]
    if verify and buffer.device.type != "cpu":
        raise ValueError("checksums are verified on the host; pass verify=False for a device buffer")
    if buffer.numel() != file_entry["nbytes"]:
        raise StoreError(
            f"{file_name} has {buffer.numel()} bytes but the manifest says {file_entry['nbytes']}: "
            "the file is truncated or was replaced; re-run endor convert"
        )
    tensors = {}
    for position, entry in enumerate(file_entry["tensors"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise StoreError(f"{file_name}: malformed manifest entry #{position}: it has no tensor name")
        name = entry["name"]
        try:
            dtype = dtype_from_name(entry["dtype"])
            # Spec order (PART_ORDER): the checksum is defined over it.
            shell = EncodedTensor(shape=tuple(entry["shape"]), dtype=dtype, layout=entry["layout"], nnz=entry["nnz"],
                                  values=buffer[:0], values_encoding=entry["values_encoding"],
                                  group_size=entry.get("group_size", 0))
            part_names = list(shell.expected_parts())
            if sorted(entry["parts"]) != sorted(part_names):
                raise StoreError(f"{file_name}: {name} lists parts {sorted(entry['parts'])}, expected {part_names}")
            parts = {}
            crc = crc32(tensor_header(file_name, file_entry.get("index"), position, entry)) if version >= 2 else 0
            for part in part_names:
                begin, end = entry["parts"][part]
                if not 0 <= begin <= end <= buffer.numel():
                    raise StoreError(f"{file_name}: {name}/{part} lies outside the file ({begin}..{end})")
                raw = buffer[begin:end]
                if verify:
                    crc = crc32(raw.numpy(), crc)
                parts[part] = raw.view(shell.part_dtype(part))
            if verify and crc != entry["crc32"]:
                raise ChecksumError(
                    f"checksum mismatch for tensor {name} in {file_name}: the store is corrupted; "
                    "re-run endor convert"
                )
            enc = EncodedTensor(
                shape=tuple(entry["shape"]), dtype=dtype, layout=entry["layout"], nnz=entry["nnz"],
                block_size=entry["block_size"], values_encoding=entry["values_encoding"],
                group_size=entry.get("group_size", 0), **parts,
            )
            if verify:
                validate_contents(enc)
                check_counts(enc)
            else:
                validate(enc)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{file_name}: malformed manifest entry for {name}: {exc!r}") from exc
        except FormatError as exc:
            raise StoreError(f"{file_name}: tensor {name}: {exc}") from exc
        tensors[name] = enc
    return tensors


def _tensor_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One tensor's setting and size, from its manifest entry (what `endor inspect --tensors` lists)."""
    numel = math.prod(entry["shape"])
    nbytes = sum(end - begin for begin, end in entry["parts"].values())
    return {"name": entry["name"], "shape": entry["shape"], "layout": entry["layout"],
            "values": entry["values_encoding"] if entry["values_encoding"] != "raw" else entry["dtype"],
            "sparsity": 1 - entry["nnz"] / numel if numel else 0.0, "nbytes": nbytes,
            "bytes_per_weight": nbytes / numel if numel else 0.0}


def _filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, root path) for a local path or a URI."""
    import pyarrow.fs

    if "://" not in location:
        return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(location)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise StoreError(f"cannot open store {location}: {exc}") from exc
    return fs, root.rstrip("/")


def _safe_relative(store: str, name: Any) -> str:
    """`name` if it is a plain relative path inside the store, else StoreError."""
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name
            or posixpath.normpath(name) != name or name.split("/")[0] == ".."):
        raise StoreError(f"{store}/{MANIFEST_NAME} points outside the store ({name!r}); the manifest is corrupted")
    if any(ord(char) < 32 or char == "\x7f" for char in name):  # a NUL ends the path in C: never ours
        raise StoreError(f"{store}/{MANIFEST_NAME} names a file with a NUL or control character ({name!r}); "
                         "the manifest is corrupted: re-run endor convert")
    return name


@dataclass
class Store:
    """A store opened for reading. `location` is a local path or a pyarrow.fs URI."""

    location: str

    def __post_init__(self) -> None:
        self.fs, self.root = _filesystem(self.location)
        self._proven_layers: set = set()  # layers (and (layer, expert)s) whose file size was compared with the manifest
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        try:
            raw = self.read_bytes(MANIFEST_NAME, max_nbytes=MAX_MANIFEST_BYTES)
        except StoreError as exc:
            raise StoreError(
                f"{self.location} is not an endor store (no readable {MANIFEST_NAME}); "
                "create one with endor convert"
            ) from exc
        where = f"{self.location}/{MANIFEST_NAME}"
        try:
            manifest = json.loads(raw.tobytes())
        except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, an int of 5000 digits
            raise StoreError(f"{where} is malformed ({str(exc).splitlines()[0][:200]}); re-run endor convert") from None
        check_manifest(manifest, where, READABLE_VERSIONS)
        check_model_config(manifest["model"]["config"], where)
        layers = manifest["layers"]
        architecture = architecture_from_config(manifest["model"]["config"])
        if len(layers) != architecture.num_layers:
            raise StoreError(f"{self.location}: manifest lists {len(layers)} layers, config says {architecture.num_layers}")
        if [entry["index"] for entry in layers] != list(range(len(layers))):
            raise StoreError(f"{where} lists its layers out of order; re-run endor convert")
        for entry in [manifest["dense"], *layers, *(expert for layer in layers for expert in layer.get("experts", []))]:
            _safe_relative(self.location, entry.get("file"))
        for entry in layers:
            if [expert["expert"] for expert in entry.get("experts", [])] != list(range(len(entry.get("experts", [])))):
                raise StoreError(f"{where} lists layer {entry['index']}'s experts out of order; re-run endor convert")
        for name in manifest.get("tokenizer_files", []):
            _safe_relative(self.location, f"{TOKENIZER_DIR}/{name}")
        return manifest

    @property
    def version(self) -> int:
        return self.manifest["format_version"]

    def _path(self, name: str) -> str:
        path = f"{self.root}/{_safe_relative(self.location, name)}"
        if self.fs.type_name == "local" and os.path.lexists(path) and os.path.realpath(path) != path:
            # endor convert writes no links: one is a store made to read what lies elsewhere
            raise StoreError(f"{path} is a symbolic link (or lies under one) to {os.path.realpath(path)}; a store "
                             "holds only its own files: re-run endor convert")
        return path

    def read_bytes(self, name: str, mmap: bool = False, nbytes: int | None = None,
                   max_nbytes: int = MAX_TOKENIZER_FILE_BYTES) -> np.ndarray:
        """A whole file of the store as a writable [nbytes] uint8 array (one sequential read).

        The file's size is compared before anything is allocated: with the manifest's `nbytes`
        where it gives one, else with `max_nbytes` (a sparse 1 TiB file is refused, not read)."""
        path = self._path(name)
        import pyarrow

        try:
            size = self._file_size(path)
            if nbytes is not None:
                files.check_size(path, size, nbytes)
            elif size > max_nbytes:
                raise StoreError(f"{path} has {size} bytes, more than the {max_nbytes} such a file may have: "
                                 "the store was tampered with or damaged; re-run endor convert")
            if mmap and self.fs.type_name == "local":
                return np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable, lazy
            buffer = np.empty(size, dtype=np.uint8)
            with self.fs.open_input_file(path) as f:
                if size and f.readinto(buffer) != size:
                    raise OSError(f"short read from {path}")
            return buffer
        except (OSError, pyarrow.ArrowException, ValueError, MemoryError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc

    def _file_size(self, path: str) -> int:
        """The size of a store file, which must be a regular file (never opened to find out)."""
        if self.fs.type_name == "local":
            return files.regular_size(path)
        import pyarrow.fs

        info = self.fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.File or info.size is None:
            raise StoreError(f"cannot read {path}: not a file ({info.type.name})")
        return info.size

    def read_into(self, name: str, buffer: torch.Tensor | np.ndarray, nbytes: int, direct: bool = False,
                  drop_cache: bool = False) -> None:
        """Read a whole file of `nbytes` bytes into `buffer[:nbytes]` (see `endor_ray.store.files`)."""
        if self.fs.type_name == "local":
            files.read_local(self._path(name), buffer, nbytes, direct=direct, drop_cache=drop_cache)
        else:
            files.read_remote(self.fs, self._path(name), buffer, nbytes)

    def local_path(self, name: str) -> str | None:
        """The file's path on this machine, or None for an object-store location."""
        return self._path(name) if self.fs.type_name == "local" else None

    @cached_property
    def architecture(self) -> Architecture:
        return architecture_from_config(self.config)

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["model"]["config"]

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest["model"]["dtype"])

    @property
    def num_layers(self) -> int:
        return len(self.manifest["layers"])

    def layer_entry(self, layer_idx: int) -> dict[str, Any]:
        """A layer's manifest entry, its file's size proven (a regular file of `nbytes` bytes) the
        first time: callers allocate buffers from `nbytes` before they read."""
        if not 0 <= layer_idx < self.num_layers:
            raise StoreError(f"layer {layer_idx} out of range: the store has {self.num_layers} layers")
        entry = self.manifest["layers"][layer_idx]
        if layer_idx not in self._proven_layers:
            path = self._path(entry["file"])
            files.check_size(path, self._file_size(path), entry["nbytes"])
            self._proven_layers.add(layer_idx)
        return entry

    def num_experts(self, layer_idx: int) -> int:
        """Experts stored apart for the layer (0: a dense layer)."""
        return len(self.manifest["layers"][layer_idx].get("experts", []))

    def expert_entry(self, layer_idx: int, expert_idx: int) -> dict[str, Any]:
        """One expert's manifest entry, its file's size proven the first time (as `layer_entry`)."""
        experts = self.layer_entry(layer_idx).get("experts", [])
        if not 0 <= expert_idx < len(experts):
            raise StoreError(f"layer {layer_idx} has no expert {expert_idx}: the store holds {len(experts)} for it")
        entry = experts[expert_idx]
        if (layer_idx, expert_idx) not in self._proven_layers:
            path = self._path(entry["file"])
            files.check_size(path, self._file_size(path), entry["nbytes"])
            self._proven_layers.add((layer_idx, expert_idx))
        return entry

    def expert_tensors(self, layer_idx: int, expert_idx: int, verify: bool = True) -> dict[str, EncodedTensor]:
        """One expert's encoded tensors, by name inside the experts module ('gate_up_proj')."""
        entry = self.expert_entry(layer_idx, expert_idx)
        data = self.read_bytes(entry["file"], nbytes=entry["nbytes"])
        return tensors_from_buffer(torch.from_numpy(data), {**entry, "index": layer_idx}, verify, self.version)

    def layer_shapes(self) -> list[dict[str, list[int]]]:
        """Per layer, tensor name (inside the layer, as the model's module names it) -> shape; an
        MoE layer's experts as the fused parameters its experts module holds ([experts, ...])."""
        from endor_ray.models.moe import expert_layout, stacked_shapes

        layout = expert_layout(self.config)
        shapes = []
        for entry in self.manifest["layers"]:
            stacked = stacked_shapes(layout, entry["experts"]) if layout and entry.get("experts") else {}
            shapes.append({**{t["name"]: t["shape"] for t in entry["tensors"]}, **stacked})
        return shapes

    def layer_bytes(self, layer_idx: int, mmap: bool = False) -> np.ndarray:
        entry = self.layer_entry(layer_idx)
        return self.read_bytes(entry["file"], mmap=mmap, nbytes=entry["nbytes"])

    def layer_tensors(self, layer_idx: int, verify: bool = True, mmap: bool = False) -> dict[str, EncodedTensor]:
        """One decoder layer's encoded tensors, by name within the layer."""
        entry = self.layer_entry(layer_idx)
        return tensors_from_buffer(torch.from_numpy(self.layer_bytes(layer_idx, mmap=mmap)), entry, verify, self.version)

    def dense_tensors(self, verify: bool = True) -> dict[str, EncodedTensor]:
        """The non-layer tensors, by full checkpoint name."""
        entry = self.manifest["dense"]
        return tensors_from_buffer(torch.from_numpy(self.read_bytes(entry["file"], nbytes=entry["nbytes"])), entry,
                                   verify, self.version)

    def tokenizer_files(self) -> dict[str, bytes]:
        """Tokenizer file name -> contents (version 2: checked against the manifest's SHA-256)."""
        files = {}
        listed = self.manifest.get("tokenizer_files", [])
        for name in listed:
            contents = self.read_bytes(f"{TOKENIZER_DIR}/{name}").tobytes()
            if isinstance(listed, dict) and hashlib.sha256(contents).hexdigest() != listed[name]:
                raise ChecksumError(f"{self.location}/{TOKENIZER_DIR}/{name} does not match its checksum in the "
                                    "manifest (edited or damaged); re-run endor convert")
            files[name] = contents
        return files

    def summary(self) -> dict[str, Any]:
        """Per-layer and total sparsity, bytes and compression ratio (what `endor inspect` shows)."""
        layers = []
        total_numel = total_nnz = 0
        for entry in self.manifest["layers"]:
            experts = entry.get("experts", [])  # an MoE layer's experts count as the layer's
            every = entry["tensors"] + [t for expert in experts for t in expert["tensors"]]
            prunable = [t for t in every if len(t["shape"]) == 2]
            numel = sum(math.prod(t["shape"]) for t in prunable)
            nnz = sum(t["nnz"] for t in prunable)
            total_numel, total_nnz = total_numel + numel, total_nnz + nnz
            dense_nbytes = sum(math.prod(t["shape"]) * dtype_from_name(t["dtype"]).itemsize for t in every)
            nbytes = entry["nbytes"] + sum(expert["nbytes"] for expert in experts)
            layers.append({
                "layer": entry["index"], "sparsity": 1 - nnz / numel if numel else 0.0,
                "nbytes": nbytes, "dense_nbytes": dense_nbytes,
                "ratio": nbytes / dense_nbytes,
                "weights": sum(math.prod(t["shape"]) for t in every),
                "tensors": [_tensor_summary(t) for t in entry["tensors"] if len(t["shape"]) == 2],
                **({"experts": len(experts), "expert_nbytes": [expert["nbytes"] for expert in experts],
                    "expert_tensors": [_tensor_summary(t) for t in experts[0]["tensors"]]} if experts else {}),
            })
        layer_nbytes = sum(layer["nbytes"] for layer in layers)
        layer_dense = sum(layer["dense_nbytes"] for layer in layers)
        dense_file = self.manifest["dense"]["nbytes"]
        return {
            "store": self.location,
            "model_type": self.architecture.model_type,
            "dtype": self.manifest["model"]["dtype"],
            "compression": self.manifest["compression"],
            "layers": layers,
            "layers_sparsity": 1 - total_nnz / total_numel if total_numel else 0.0,
            "layers_nbytes": layer_nbytes,
            "layers_dense_nbytes": layer_dense,
            "layers_ratio": layer_nbytes / layer_dense,
            "layers_bytes_per_weight": layer_nbytes / max(1, sum(layer["weights"] for layer in layers)),
            "dense_file_nbytes": dense_file,
            "total_nbytes": layer_nbytes + dense_file,
            "total_ratio": (layer_nbytes + dense_file) / (layer_dense + dense_file),
        }
