"""A store tampered with so that its checksums still hold: each case ends in one line that names the
file and what to check (never a traceback), no buffer is sized from a number the file has not
proven, no read blocks on a file that is not a regular file, and `endor inspect --verify` and
`endor export` catch a config that contradicts the tensors and numbers that are not finite."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from endor_ray.compress.convert import ConvertConfig, convert
from endor_ray.errors import StoreError
from endor_ray.store import Store

from conftest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine_store(tiny_checkpoints, tmp_path_factory):
    return convert(str(tiny_checkpoints["llama-gqa"]), tmp_path_factory.mktemp("stores") / "llama",
                   ConvertConfig(method="magnitude", block_size=256), progress=False)


@pytest.fixture(scope="module")
def int4_store(tiny_checkpoints, tmp_path_factory):
    return convert(str(tiny_checkpoints["llama-gqa"]), tmp_path_factory.mktemp("int4-store") / "int4",
                   ConvertConfig(method="magnitude", block_size=256, values="int4", group_size=16), progress=False)


@pytest.fixture
def store_copy(pristine_store, tmp_path):
    return shutil.copytree(pristine_store, tmp_path / "store")


def _reseal(store: Path, change) -> None:
    """Edit the manifest and recompute its checksum, as someone crafting a store would."""
    from endor_ray.store.manifest import seal

    manifest = read_manifest(store)
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(seal(manifest)))


def _config(**fields):
    return lambda store: _reseal(store, lambda m: m["model"]["config"].update(fields))


def _layer_file(store: Path, layer_idx: int = 0) -> Path:
    return store / read_manifest(store)["layers"][layer_idx]["file"]


def _big_number(store: Path) -> None:
    text = (store / "manifest.json").read_text()
    nbytes = read_manifest(store)["layers"][0]["nbytes"]
    assert f'"nbytes": {nbytes}' in text
    (store / "manifest.json").write_text(text.replace(f'"nbytes": {nbytes}', '"nbytes": ' + "9" * 5000, 1))


def _sparse(path: Path, size: int = 1 << 40) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)  # a hole: no disk used, but read whole it is 1 TiB


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _set_number(store: Path, part: str, value: float, layer_idx: int = 0) -> None:
    """Write `value` as the first number of `part` in a layer's first tensor that has it, and fix its
    CRC and the manifest's checksum (a crafted store: every checksum holds)."""
    from endor_ray.format.tensor import PART_ORDER, crc32, dtype_from_name
    from endor_ray.store.manifest import seal, tensor_header

    manifest = read_manifest(store)
    entry = manifest["layers"][layer_idx]
    position, tensor = next((i, t) for i, t in enumerate(entry["tensors"]) if part in t["parts"])
    path = store / entry["file"]
    data = bytearray(path.read_bytes())
    begin = tensor["parts"][part][0]
    number = torch.tensor([value], dtype=dtype_from_name(tensor["dtype"])).view(torch.uint8).numpy().tobytes()
    data[begin:begin + len(number)] = number
    path.write_bytes(bytes(data))
    crc = crc32(tensor_header(entry["file"], entry["index"], position, tensor))
    for name in PART_ORDER:
        if name in tensor["parts"]:
            crc = crc32(bytes(data[slice(*tensor["parts"][name])]), crc)
    tensor["crc32"] = crc
    (store / "manifest.json").write_text(json.dumps(seal(manifest)))


# name -> (change, the call that must refuse it: "open" | "layer 0" | "verify", words of the message)
TAMPERING = {
    "a 5000-digit number in the manifest": (_big_number, "open", "malformed"),
    "a NUL in a file name": (lambda s: _reseal(s, lambda m: m["layers"][0].update(
        file="layers/layer-00000.safetensors\x00.x")), "open", "NUL"),
    "zero attention heads": (_config(num_attention_heads=0), "open", "num_attention_heads"),
    "a negative context length": (_config(max_position_embeddings=-5), "open", "max_position_embeddings"),
    "a zero context length": (_config(max_position_embeddings=0), "open", "max_position_embeddings"),
    "an activation transformers does not know": (_config(hidden_act="bogus"), "verify", "transformers rejects"),
    "a rope type transformers does not know": (_config(rope_scaling={"rope_type": "bogus", "factor": 2.0}),
                                               "verify", "transformers rejects"),
    "a vocab_size that is not the embedding's": (_config(vocab_size=100), "verify", "vocab_size"),
    "nbytes 10**18": (lambda s: _reseal(s, lambda m: m["layers"][0].update(nbytes=10**18)), "layer 0",
                      "manifest says 1000000000000000000"),
    "a sparse 1 TiB layer file": (lambda s: _sparse(_layer_file(s)), "layer 0", "1099511627776 bytes"),
    "a sparse 1 TiB non-layer file": (lambda s: _sparse(s / "dense.safetensors"), "verify", "1099511627776 bytes"),
    "a sparse 1 TiB tokenizer file": (lambda s: _sparse(s / "tokenizer" / "generation_config.json"), "verify",
                                      "1099511627776 bytes"),
    "a FIFO as a layer file": (lambda s: _fifo(_layer_file(s)), "layer 0", "a FIFO, not a regular file"),
    "a FIFO as the non-layer file": (lambda s: _fifo(s / "dense.safetensors"), "verify", "a FIFO"),
    "a NaN value, CRC fixed": (lambda s: _set_number(s, "values", float("nan")), "verify", "NaN or infinite"),
    "an infinite value, CRC fixed": (lambda s: _set_number(s, "values", float("inf")), "verify", "NaN or infinite"),
}


def _refused(store: Path, where: str, message: str) -> None:
    if where == "open":
        with pytest.raises(StoreError, match=message):
            Store(str(store))
        return
    opened = Store(str(store))
    if where == "layer 0":
        with pytest.raises(StoreError, match=message):
            opened.layer_tensors(0)
    from endor_ray.store.audit import audit

    problems = audit(opened, progress=False)
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_one_line(store_copy, case, tmp_path, capsys):
    """The reader refuses it; `inspect --verify` and `export` print one error line and exit 1."""
    from endor_ray.cli import main

    change, where, message = TAMPERING[case]
    change(store_copy)
    if "FIFO" in case:  # a read that blocks would hang this test: the checks run in a child with a timeout
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import conftest, test_store_tampering as t; "
                f"t._refused(__import__('pathlib').Path({str(store_copy)!r}), {where!r}, {message!r})")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        _refused(store_copy, where, message)
    capsys.readouterr()
    for argv in (["inspect", str(store_copy), "--verify"], ["export", str(store_copy), str(tmp_path / "hf"), "--quiet"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "hf").exists()


def test_a_nan_scale_is_caught(int4_store, tmp_path):
    store = shutil.copytree(int4_store, tmp_path / "store")
    _set_number(store, "scales", float("nan"))
    opened = Store(str(store))
    opened.layer_tensors(0)  # the decode path's read skips the values (docstring of format.verify)
    from endor_ray.store.audit import audit

    assert any("scales are NaN or infinite" in problem for problem in audit(opened, progress=False))


def test_a_nan_in_gguf_blocks_is_caught():
    from endor_ray.errors import FormatError
    from endor_ray.format.gguf_blocks import quantize_blocks
    from endor_ray.format.tensor import gguf_tensor
    from endor_ray.format.verify import check_finite

    weight = torch.randn(4, 64)
    blocks = quantize_blocks(weight, "q8_0")
    check_finite(gguf_tensor(blocks.clone(), "q8_0", (4, 64), torch.float32))
    blocks = blocks.clone()
    blocks[0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # the first block's fp16 scale: NaN
    with pytest.raises(FormatError, match="dequantized values are NaN"):
        check_finite(gguf_tensor(blocks, "q8_0", (4, 64), torch.float32))


def test_readers_size_no_buffer_from_an_unproven_nbytes(store_copy):
    """The engine's reader and the shard server allocate from the manifest's nbytes: 10**18 there
    is refused before any allocation, in one line."""
    from endor_ray.engine.readers import StoreReader
    from endor_ray.service.shard_server import ShardServer

    _reseal(store_copy, lambda m: m["layers"][1].update(nbytes=10**18))
    store = Store(str(store_copy))
    with pytest.raises(StoreError, match="manifest says 1000000000000000000"):
        StoreReader(store, host_layers=(1,), progress=False)
    with pytest.raises(StoreError, match="manifest says 1000000000000000000"):
        ShardServer(str(store_copy), memory_layers=[0], disk_layers=[1])
    assert ShardServer(str(store_copy), memory_layers=[0, 2]).layers == [0, 2]  # the other layers still serve


def test_a_fifo_read_does_not_block(tmp_path):
    """files.read_local on a FIFO (or one swapped in after the store opened) returns at once."""
    fifo = tmp_path / "layer.safetensors"
    os.mkfifo(fifo)
    code = ("import numpy as np; from endor_ray.store import files; from endor_ray.errors import StoreError\n"
            f"try:\n    files.read_local({str(fifo)!r}, np.empty(64, np.uint8), 64)\n"
            "except StoreError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "a FIFO, not a regular file" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("case", ["an activation transformers does not know", "a FIFO as a layer file",
                                  "nbytes 10**18"])
def test_endor_generate_says_one_line(tiny_stores, tmp_path, case):
    """`endor generate --in-process` on the tampered store: one error line and exit 1, in bounded time
    (a FIFO read would block it for ever)."""
    store_copy = shutil.copytree(tiny_stores["llama-gqa"], tmp_path / "store")  # one with a tokenizer
    TAMPERING[case][0](store_copy)
    command = [sys.executable, "-m", "endor_ray.cli", "generate", str(store_copy), "--in-process", "--prompt", "Hi",
               "--max-new-tokens", "2", "--gpu-memory", "0"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert TAMPERING[case][2] in errors[0], errors[0]
