"""The store: reading from paths and URIs, and every way a store can be damaged."""

import json
import shutil

import pytest
import torch

from endor_ray.store import convert as convert_module
from endor_ray.store.convert import ConvertConfig, convert
from endor_ray.errors import ChecksumError, StoreError
from endor_ray.format import decode
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


def write_manifest(store, manifest) -> None:
    (store / "manifest.json").write_text(json.dumps(manifest))


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
    with pytest.raises(StoreError, match="malformed manifest entry"):
        Store(str(store_copy)).layer_tensors(0)


def test_unreadable_uri():
    with pytest.raises(StoreError):
        Store("nosuchscheme://bucket/store")
    with pytest.raises(StoreError, match="not an endor store"):
        Store("file:///nonexistent/store")


def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    real_write = convert_module.write_tensor_file
    calls = []

    def write_then_interrupt(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, tensors)

    monkeypatch.setattr(convert_module, "write_tensor_file", write_then_interrupt)
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


def test_version_2_parts_are_aligned_and_files_stay_safetensors(pristine_store):
    from safetensors.torch import load_file

    manifest = read_manifest(pristine_store)
    assert manifest["format_version"] == 2
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
        entry["nbytes"] = len(raw)
    write_manifest(old, {**manifest, "format_version": 1})
    assert any(begin % 64 for t in read_manifest(old)["layers"][0]["tensors"] for begin, _ in t["parts"].values())
    v1 = Store(str(old))
    for layer_idx in range(v1.num_layers):
        a, b = v1.layer_tensors(layer_idx), new.layer_tensors(layer_idx)
        assert all(torch.equal(decode(a[name]), decode(b[name])) for name in b)
