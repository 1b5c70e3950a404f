"""`endor generate` inside a real cgroup v1 memory limit smaller than the model's dense weights.

Before the engine sized its slots and tiers from the cgroup's limit, it sized them from the
machine's MemAvailable: on CPU every layer decoded and resident (the model fits half the machine's
memory), which the limit cannot hold, so the kernel killed it. Now it reads the limit, streams the
layers through the slots that fit, says so, and finishes under the limit. Needs root and a
writable /sys/fs/cgroup/memory (skipped otherwise); the child cgroup is removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

V1 = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20


def make_cgroup(name: str) -> Path | None:
    folder = V1 / name
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError:
        if folder.is_dir():
            folder.rmdir()
        return None
    return folder


def remove_cgroup(folder: Path) -> None:
    for _ in range(50):  # the child has exited; the kernel lets the folder go once it holds no task
        try:
            folder.rmdir()
            return
        except OSError:
            time.sleep(0.1)


@pytest.fixture
def cgroup():
    if not V1.is_dir() or not os.access(V1, os.W_OK):
        pytest.skip("cgroup v1 memory controller not mounted writable at /sys/fs/cgroup/memory")
    folder = make_cgroup(f"endor-test-{os.getpid()}")
    if folder is None:
        pytest.skip("cannot create a memory cgroup here")
    try:
        yield folder
    finally:
        remove_cgroup(folder)


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory, smollm2_dir) -> tuple[Path, int]:
    """A random Llama whose bf16 decoder layers (about 1.06 GB) exceed the limit, its dense store
    (converting is a copy: quick on a loaded machine), and the layers' dense bytes."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from endor_ray.compress.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("cgroup-model")
    config = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=56, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=49152, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "hf")
    dense_nbytes = sum(p.numel() * 2 for p in model.model.layers.parameters())
    del model
    for path in smollm2_dir.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, root / "hf" / path.name)
    store = convert(str(root / "hf"), root / "store",
                    ConvertConfig(sparsity=0.0, method="magnitude", store_format="dense"), progress=False)
    return Path(store), dense_nbytes


LIMIT = 900 * MiB


def test_generate_finishes_inside_a_limit_smaller_than_its_layers(cgroup, wide_store):
    store, dense_nbytes = wide_store
    assert dense_nbytes > LIMIT  # the old sizing (every layer decoded and resident) cannot fit
    (cgroup / "memory.limit_in_bytes").write_text(str(LIMIT))
    command = (f"echo $$ > {cgroup / 'cgroup.procs'} && exec {sys.executable} -m endor_ray.cli generate {store} "
               "--in-process --device cpu --prompt 'The capital of' --max-new-tokens 4")
    run = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
    oom = (cgroup / "memory.oom_control").read_text()
    assert run.returncode == 0, f"rc {run.returncode} (-9: killed for memory; {oom!r})\n{run.stderr[-3000:]}"
    assert "oom_kill 0" in oom or "oom_kill" not in oom
    assert peak <= LIMIT
    note = next(line for line in run.stderr.splitlines() if line.startswith("memory limit"))
    assert f"cgroup v1 {cgroup}" in note and "slots of" in note, note
    assert "-- 4 tokens" in run.stderr
    # The old sizing, asked for explicitly (every layer resident in half of MemAvailable): killed
    from endor_ray.utils.memory import meminfo

    old_budget = int(0.5 * meminfo("/proc")["MemAvailable"])
    killed = subprocess.run(["sh", "-c", command + f" --gpu-memory {old_budget}B"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    oom = (cgroup / "memory.oom_control").read_text()
    assert killed.returncode != 0 and "oom_kill 0" not in oom, killed.stderr[-2000:]
