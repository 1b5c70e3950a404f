"""The store: reading from paths and URIs, and every way a store can be damaged."""

import json
import shutil

import pytest
import torch

from endor_ray.compress import layer_writer as layer_writer_module
from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.errors import ChecksumError, StoreError
from endor_ray.format import checksum, decode
from endor_ray.store import Store

from conftest import read_manifest


@pytest.fixture(scope="module")
def pristine_store(tiny_checkpoints, tmp_path_factory):
    destination = tmp_path_factory.mktemp("stores") / "llama"
    return convert(str(tiny_checkpoints["llama-gqa"]), destination,
                   ConvertConfig(method="magnitude", block_size=256), progress=False)


@pytest.fixture
def store_copy(pristine_store, tmp_path):
    return shutil.copytree(pristine_store, tmp_path / "store")


def write_manifest(store, manifest, seal: bool = True) -> None:
    """Replace the manifest; sealed, the change passes the manifest checksum (a crafted store)."""
    from endor_ray.store.manifest import seal as seal_manifest

    (store / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if seal else manifest))


def test_local_path_and_file_uri_read_the_same(pristine_store):
    local, uri = Store(str(pristine_store)), Store(pristine_store.resolve().as_uri())
    assert uri.location.startswith("file://")
    for layer_idx in range(local.num_layers):
        a, b = local.layer_tensors(layer_idx), uri.layer_tensors(layer_idx)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(decode(a[name]), decode(b[name]))
    mapped = local.layer_tensors(0, mmap=True)
    assert all(torch.equal(decode(mapped[n]), decode(local.layer_tensors(0)[n])) for n in mapped)
    assert set(local.tokenizer_files()) == {"generation_config.json"}  # no tokenizer in the tiny checkpoint


def test_summary(pristine_store):
    summary = Store(str(pristine_store)).summary()
    assert summary["layers_sparsity"] == pytest.approx(0.5, abs=0.01)
    files = sorted((pristine_store / "layers").iterdir())
    assert [layer["nbytes"] for layer in summary["layers"]] == [f.stat().st_size for f in files]


def test_flipped_byte_names_file_and_tensor(store_copy):
    entry = read_manifest(store_copy)["layers"][1]
    tensor = next(t for t in entry["tensors"] if t["layout"] == "bitmap")
    path = store_copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[tensor["parts"]["values"][0] + 5] ^= 0x10
    path.write_bytes(bytes(data))
    store = Store(str(store_copy))
    store.layer_tensors(0)  # other layers still read
    with pytest.raises(ChecksumError, match=rf"{tensor['name']}.*{entry['file']}"):
        store.layer_tensors(1)


def test_truncated_layer_file(store_copy):
    path = store_copy / read_manifest(store_copy)["layers"][2]["file"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StoreError, match="truncated"):
        Store(str(store_copy)).layer_tensors(2)


def test_missing_layer_file(store_copy):
    (store_copy / read_manifest(store_copy)["layers"][0]["file"]).unlink()
    with pytest.raises(StoreError, match="cannot read"):
        Store(str(store_copy)).layer_tensors(0)


@pytest.mark.parametrize("bad_file", ["../outside.safetensors", "/etc/passwd", "layers/../../x", ""])
def test_manifest_pointing_outside_the_store(store_copy, bad_file):
    manifest = read_manifest(store_copy)
    manifest["layers"][0]["file"] = bad_file
    write_manifest(store_copy, manifest)
    with pytest.raises(StoreError, match="outside the store"):
        Store(str(store_copy))


def test_part_range_outside_the_file(store_copy):
    manifest = read_manifest(store_copy)
    manifest["layers"][0]["tensors"][0]["parts"]["values"] = [0, 10**9]
    write_manifest(store_copy, manifest)
    with pytest.raises(StoreError, match="outside the file"):
        Store(str(store_copy)).layer_tensors(0)


def test_incompatible_version_and_malformed_manifest(store_copy):
    manifest = read_manifest(store_copy)
    write_manifest(store_copy, {**manifest, "format_version": 99})
    with pytest.raises(StoreError, match="format version 99"):
        Store(str(store_copy))
    (store_copy / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="malformed"):
        Store(str(store_copy))
    (store_copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not an endor store"):
        Store(str(store_copy))
    del manifest["layers"][0]["tensors"][0]["name"]
    write_manifest(store_copy, manifest)
    with pytest.raises(StoreError, match=r"layers\.0\.tensors\.0\.name: Field required"):
        Store(str(store_copy))


def test_unreadable_uri():
    with pytest.raises(StoreError):
        Store("nosuchscheme://bucket/store")
    with pytest.raises(StoreError, match="not an endor store"):
        Store("file:///nonexistent/store")


def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    real_write = layer_writer_module.write_tensor_file
    calls = []

    def write_then_interrupt(path, tensors, file_name, layer_idx=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, tensors, file_name, layer_idx)

    monkeypatch.setattr(layer_writer_module, "write_tensor_file", write_then_interrupt)  # the second layer's file
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_checkpoints["llama-gqa"]), tmp_path / "store", ConvertConfig(method="magnitude"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_on_success(tiny_checkpoints, pristine_store, tmp_path):
    destination = shutil.copytree(pristine_store, tmp_path / "store")
    with pytest.raises(StoreError, match="already exists"):
        convert(str(tiny_checkpoints["opt"]), destination, ConvertConfig(method="magnitude"), progress=False)
    convert(str(tiny_checkpoints["opt"]), destination, ConvertConfig(method="magnitude", force=True), progress=False)
    assert Store(str(destination)).architecture.model_type == "opt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.fixture(scope="module")
def quantized_store(tiny_checkpoints, tmp_path_factory):
    """INT4 values at 50% (groups of 16) and INT8 dense tensors (sparsity 0) in one tiny store."""
    root = tmp_path_factory.mktemp("quantized-store")
    return convert(str(tiny_checkpoints["llama-gqa"]), root / "int4",
                   ConvertConfig(method="magnitude", block_size=256, values="int4", group_size=16), progress=False)


@pytest.mark.parametrize("which", ["raw", "int4"])
def test_parts_are_aligned_and_files_stay_safetensors(pristine_store, quantized_store, which):
    from safetensors.torch import load_file

    pristine_store = pristine_store if which == "raw" else quantized_store
    manifest = read_manifest(pristine_store)
    assert manifest["format_version"] == 3
    store = Store(str(pristine_store))
    for entry in [manifest["dense"], *manifest["layers"]]:
        ranges = [r for tensor in entry["tensors"] for r in tensor["parts"].values()]
        assert all(begin % 64 == 0 for begin, _ in ranges), entry["file"]
        loaded = load_file(str(pristine_store / entry["file"]))  # the safetensors library reads it
        tensors = store.dense_tensors() if entry is manifest["dense"] else store.layer_tensors(entry["index"])
        for name, enc in tensors.items():
            for part, data in enc.parts().items():
                assert torch.equal(loaded[f"{name}/{part}"].view(torch.uint8), data.view(torch.uint8))
        pads = [key for key in loaded if key.startswith("__pad__/")]
        assert all(loaded[key].dtype == torch.uint8 and not loaded[key].any() for key in pads)


def test_version_2_stores_are_still_read(pristine_store, tmp_path):
    """A raw store of version 2 differs only in its version number (same files and checksums)."""
    old = shutil.copytree(pristine_store, tmp_path / "v2")
    write_manifest(old, {**read_manifest(old), "format_version": 2})
    v2, new = Store(str(old)), Store(str(pristine_store))
    assert v2.version == 2
    a, b = v2.layer_tensors(0), new.layer_tensors(0)
    assert all(torch.equal(decode(a[name]), decode(b[name])) for name in b)


def test_quantized_tensors_that_lie_are_caught(quantized_store, tmp_path):
    """Row offsets that disagree with the bitmap, or promise more than the scales hold, are refused
    at read even where the checksum is recomputed (a crafted store); plain damage fails the CRC."""
    import dataclasses

    from endor_ray.errors import FormatError
    from endor_ray.format.verify import check_counts

    from endor_ray.format import encode

    assert {e.values_encoding for e in Store(str(quantized_store)).layer_tensors(0).values() if e.layout == "bitmap"} == {"int4"}
    weight = torch.randn(8, 64)
    weight[torch.rand(8, 64) < 0.6] = 0  # rows of different counts, below their groups' room
    weight[0, :40] = 0
    enc = encode(weight, block_size=256, layout="bitmap", encoding="int4", group_size=16)
    check_counts(enc)
    moved = enc.row_offsets.clone()
    moved[1] += 1
    with pytest.raises(FormatError, match="row 0 has"):
        check_counts(dataclasses.replace(enc, row_offsets=moved))
    bloated = enc.row_offsets.clone()
    bloated[1:] += enc.groups_per_row * enc.group_size
    bloated[-1] = enc.nnz
    with pytest.raises(FormatError, match="row offsets decrease|more than"):
        check_counts(dataclasses.replace(enc, row_offsets=bloated))
    damaged = shutil.copytree(quantized_store, tmp_path / "damaged")
    manifest = read_manifest(damaged)
    tensor = next(t for t in manifest["layers"][0]["tensors"] if "scales" in t["parts"])
    begin = tensor["parts"]["scales"][0]
    path = damaged / manifest["layers"][0]["file"]
    raw = bytearray(path.read_bytes())
    raw[begin] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError):
        Store(str(damaged)).layer_tensors(0)


def test_version_1_stores_are_still_read(pristine_store, tmp_path):
    """A store written by endor-ray 0.1 (safetensors' own layout, parts unaligned) decodes the same."""
    import struct

    from safetensors.torch import save_file

    old = shutil.copytree(pristine_store, tmp_path / "v1")
    manifest = read_manifest(old)
    new = Store(str(pristine_store))
    for entry in [manifest["dense"], *manifest["layers"]]:
        tensors = new.dense_tensors() if entry is manifest["dense"] else new.layer_tensors(entry["index"])
        save_file({f"{name}/{part}": data.clone() for name, enc in tensors.items()
                   for part, data in enc.parts().items()}, str(old / entry["file"]))
        raw = (old / entry["file"]).read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + header_len])
        for tensor in entry["tensors"]:
            tensor["parts"] = {part: [8 + header_len + offset for offset in header[f"{tensor['name']}/{part}"]["data_offsets"]]
                               for part in tensor["parts"]}
            tensor["crc32"] = checksum(tensors[tensor["name"]])  # version 1: the bytes only
        entry["nbytes"] = len(raw)
    write_manifest(old, {**manifest, "format_version": 1}, seal=False)
    assert any(begin % 64 for t in read_manifest(old)["layers"][0]["tensors"] for begin, _ in t["parts"].values())
    v1 = Store(str(old))
    for layer_idx in range(v1.num_layers):
        a, b = v1.layer_tensors(layer_idx), new.layer_tensors(layer_idx)
        assert all(torch.equal(decode(a[name]), decode(b[name])) for name in b)


# -- tampering: every way a store can be made to lie, and where it is caught ---------------------


def _bitmap_tensor(manifest, layer_idx=0):
    return next(t for t in manifest["layers"][layer_idx]["tensors"] if t["layout"] == "bitmap")


def _swap(items, a=0, b=1):
    items[a], items[b] = items[b], items[a]


def _edit(store, change, seal=True):
    manifest = read_manifest(store)
    change(manifest)
    write_manifest(store, manifest, seal=seal)


def _rewrite_part(store, part, change, fix_crc=True):
    """Change a part's bytes in layer 0's first bitmap tensor; with fix_crc, recompute its checksum
    and reseal the manifest, as someone crafting a store would."""
    from endor_ray.format.tensor import crc32
    from endor_ray.store.manifest import tensor_header

    manifest = read_manifest(store)
    entry = manifest["layers"][0]
    position, tensor = next((i, t) for i, t in enumerate(entry["tensors"]) if t["layout"] == "bitmap")
    path = store / entry["file"]
    data = bytearray(path.read_bytes())
    begin, end = tensor["parts"][part]
    data[begin:end] = change(bytes(data[begin:end]))
    path.write_bytes(bytes(data))
    if fix_crc:
        crc = crc32(tensor_header(entry["file"], entry["index"], position, tensor))
        for name in ("bitmap", "block_offsets", "values"):
            crc = crc32(bytes(data[tensor["parts"][name][0]:tensor["parts"][name][1]]), crc)
        tensor["crc32"] = crc
        write_manifest(store, manifest)


def _offsets_out_of_range(raw: bytes) -> bytes:
    import numpy as np

    offsets = np.frombuffer(raw, dtype=np.int64).copy()
    offsets[1] = offsets[-1] + 10**6  # an interior offset far past nnz
    return offsets.tobytes()


def _nested(store):
    (store / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _symlink_tokenizer(store):
    target = store / "tokenizer" / "generation_config.json"
    target.unlink()
    target.symlink_to("/etc/passwd")


def _symlink_layer(store):
    entry = read_manifest(store)["layers"][1]
    path = store / entry["file"]
    outside = store.parent / "elsewhere.safetensors"
    path.rename(outside)
    path.symlink_to(outside)


TAMPERING = {  # name -> (change, where it is caught: "open" | "layer 0" | "layer 1" | "tokenizer" | "audit", message)
    "swap two tensor names": (lambda s: _edit(s, lambda m: _swap(m["layers"][0]["tensors"]), seal=False), "open", "checksum"),
    "swap two layers": (lambda s: _edit(s, lambda m: _swap(m["layers"]), seal=False), "open", "checksum"),
    "transpose a shape": (lambda s: _edit(s, lambda m: _bitmap_tensor(m)["shape"].reverse(), seal=False), "open", "checksum"),
    "drop a tensor": (lambda s: _edit(s, lambda m: m["layers"][0]["tensors"].pop(), seal=False), "open", "checksum"),
    "edit the config": (lambda s: _edit(s, lambda m: m["model"]["config"].update(hidden_size=65), seal=False), "open", "checksum"),
    "swap two tensor names, resealed": (lambda s: _edit(s, lambda m: _swap(m["layers"][0]["tensors"])), "layer 0", "checksum mismatch"),
    "swap two layers' files, resealed": (lambda s: _edit(s, lambda m: [_swap(m["layers"]), [e.update(index=i) for i, e in enumerate(m["layers"])]]), "layer 0", "checksum mismatch"),
    "swap two layers' entries, resealed": (lambda s: _edit(s, lambda m: _swap(m["layers"])), "open", "out of order"),
    "transpose a shape, resealed": (lambda s: _edit(s, lambda m: _bitmap_tensor(m)["shape"].reverse()), "layer 0", "checksum mismatch"),
    "drop the last tensor, resealed": (lambda s: _edit(s, lambda m: m["layers"][0]["tensors"].pop()), "audit", "lacks"),
    "change a dtype, resealed": (lambda s: _edit(s, lambda m: _bitmap_tensor(m).update(dtype="float16")), "layer 0", "checksum mismatch"),
    "layers is a number": (lambda s: _edit(s, lambda m: m.update(layers=3)), "open", "layers: Input should be a valid list"),
    "no dense entry": (lambda s: _edit(s, lambda m: m.pop("dense")), "open", "dense: Field required"),
    "config is a string": (lambda s: _edit(s, lambda m: m["model"].update(config="llama")), "open", "model.config"),
    "nbytes is a string": (lambda s: _edit(s, lambda m: m["layers"][0].update(nbytes="12")), "open", "layers.0.nbytes"),
    "negative shape": (lambda s: _edit(s, lambda m: _bitmap_tensor(m).update(shape=[-64, 64])), "open", "shape.0"),
    "nnz is a bool": (lambda s: _edit(s, lambda m: _bitmap_tensor(m).update(nnz=True)), "open", "nnz"),
    "manifest nested 100,000 deep": (_nested, "open", "malformed"),
    "flipped byte in values": (lambda s: _rewrite_part(s, "values", lambda b: bytes([b[0] ^ 1]) + b[1:], fix_crc=False), "layer 0", "checksum mismatch"),
    "interior block offset past nnz, checksum recomputed": (lambda s: _rewrite_part(s, "block_offsets", _offsets_out_of_range), "layer 0", "block offsets"),
    "bitmap with extra bits, checksum recomputed": (lambda s: _rewrite_part(s, "bitmap", lambda b: b"\xff" * len(b)), "layer 0", "set bits"),
    "a file name outside the store, resealed": (lambda s: _edit(s, lambda m: m["layers"][0].update(file="../x.safetensors")), "open", "outside the store"),
    "tokenizer file linked to /etc/passwd": (_symlink_tokenizer, "tokenizer", "symbolic link"),
    "layer file linked outside the store": (_symlink_layer, "layer 1", "symbolic link"),
    "tokenizer file edited": (lambda s: (s / "tokenizer" / "generation_config.json").write_text("{}"), "tokenizer", "checksum"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_caught(store_copy, case):
    change, where, message = TAMPERING[case]
    change(store_copy)
    if where == "open":
        with pytest.raises(StoreError, match=message):
            Store(str(store_copy))
        return
    store = Store(str(store_copy))
    if where == "audit":  # consistent bytes, but not the model's tensors
        from endor_ray.store.audit import audit

        problems = audit(store, progress=False)
        assert problems and message in problems[-1], problems
        return
    read = {"layer 0": lambda: store.layer_tensors(0), "layer 1": lambda: store.layer_tensors(1),
            "tokenizer": store.tokenizer_files}[where]
    with pytest.raises(StoreError, match=message):
        read()
    from endor_ray.store.audit import audit

    assert audit(store, progress=False)  # the audit finds it too


def test_pristine_store_passes_the_audit(pristine_store):
    from endor_ray.store.audit import audit

    assert audit(Store(str(pristine_store)), progress=False) == []


def test_export_refuses_a_store_that_is_not_its_model(store_copy, tmp_path):
    from endor_ray.store.export import export_checkpoint

    _edit(store_copy, lambda m: m["layers"][0]["tensors"].pop())  # consistent, resealed, one tensor short
    with pytest.raises(StoreError, match="lacks"):
        export_checkpoint(Store(str(store_copy)), tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_inspect_verify_exit_codes(store_copy, capsys):
    from endor_ray.cli import main

    assert main(["inspect", str(store_copy), "--verify"]) == 0
    assert "checks out" in capsys.readouterr().out
    _rewrite_part(store_copy, "values", lambda b: bytes([b[0] ^ 1]) + b[1:], fix_crc=False)
    assert main(["inspect", str(store_copy), "--verify"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "layer 0" in err[0] and "checksum mismatch" in err[0]


def test_a_checkpoint_index_pointing_outside_is_refused(tiny_checkpoints, tmp_path):
    checkpoint = shutil.copytree(tiny_checkpoints["opt"], tmp_path / "ckpt")
    names = list(json.loads(((checkpoint / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (checkpoint / "model.safetensors").read_bytes()[:8], "little")])))
    index = {"weight_map": {name: "/etc/passwd" if index == 0 else "model.safetensors"
                            for index, name in enumerate(n for n in names if n != "__metadata__")}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="points outside the checkpoint"):
        convert(str(checkpoint), tmp_path / "store", ConvertConfig(method="magnitude"), progress=False)


def test_a_killed_runs_partial_folder_is_removed_by_the_next(tiny_checkpoints, tmp_path, caplog):
    import socket

    stale = tmp_path / ".store.partial-dead"
    stale.mkdir()
    (stale / "layer-00000.safetensors").write_bytes(b"x" * 1000)
    (stale / ".endor-owner").write_text(f"{socket.gethostname()}:{2**22 + 12345}")  # no such process
    foreign = tmp_path / ".store.partial-other"
    foreign.mkdir()  # no owner file: not ours to remove
    convert(str(tiny_checkpoints["opt"]), tmp_path / "store", ConvertConfig(method="magnitude"), progress=False)
    assert not stale.exists() and foreign.exists()
    assert "left by an interrupted run" in caplog.text


def test_gguf_block_tensors_are_stored_and_read(store_copy):
    """A layer holding llama.cpp blocks (format version 3) reads back through the store; an encoding
    the format does not know is refused by the manifest's schema, naming the field."""
    from endor_ray.format import encode
    from endor_ray.store.store import write_tensor_file

    manifest = read_manifest(store_copy)
    tensors = Store(str(store_copy)).layer_tensors(0)
    name = "self_attn.q_proj.weight"
    tensors[name] = encode(decode(tensors[name]), encoding="q4_1", layout="dense")
    file_name = manifest["layers"][0]["file"]
    manifest["layers"][0] = write_tensor_file(store_copy / file_name, tensors, file_name, layer_idx=0)
    write_manifest(store_copy, manifest)
    read = Store(str(store_copy)).layer_tensors(0)
    assert read[name].values_encoding == "q4_1" and list(read[name].parts()) == ["values"]
    assert all(torch.equal(decode(read[key]), decode(tensors[key])) for key in tensors)
    position = [entry["name"] for entry in manifest["layers"][0]["tensors"]].index(name)
    manifest["layers"][0]["tensors"][position]["values_encoding"] = "iq2_xs"  # a ggml type not read
    write_manifest(store_copy, manifest)
    with pytest.raises(StoreError, match=rf"layers\.0\.tensors\.{position}\.values_encoding"):
        Store(str(store_copy))
