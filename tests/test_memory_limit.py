"""The memory a process may use (cgroup v2 / v1 limits, MemAvailable) and the slots and tiers sized from it.

Fake /proc and cgroup trees in tmp folders; the sizing against plain arithmetic; the page cache left
alone by buffered reads. A real cgroup v1 run is in tests/test_cgroup_run.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from endor_ray.engine.config import EngineConfig
from endor_ray.engine.memory_plan import HEADROOM_BYTES, HEADROOM_FRACTION, size_for_memory
from endor_ray.engine.tiers import plan_tiers
from endor_ray.errors import ConfigError
from endor_ray.store.files import read_local
from endor_ray.utils.memory import MemoryLimit, memory_limit

GiB, MiB = 1 << 30, 1 << 20


def fake_proc(root: Path, cgroup_lines: list[str], total: int = 24 * GiB, available: int = 20 * GiB) -> Path:
    proc = root / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    (proc / "meminfo").write_text(f"MemTotal: {total // 1024} kB\nMemFree: 1 kB\n"
                                  f"MemAvailable: {available // 1024} kB\n")
    return proc


def v1_files(folder: Path, limit: int, usage: int, cache: int, shmem: int = 0, mapped: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (folder / "memory.stat").write_text(f"cache 1\nrss 2\ntotal_cache {cache}\ntotal_rss 5\ntotal_shmem {shmem}\n"
                                        f"total_mapped_file {mapped}\n")


def test_no_cgroup_limit_is_mem_available(tmp_path):
    proc = fake_proc(tmp_path, ["0::/"], total=24 * GiB, available=20 * GiB)
    limit = memory_limit(proc, tmp_path / "nothing-mounted")
    assert limit == MemoryLimit(24 * GiB, 20 * GiB, "MemAvailable")


def test_cgroup_v1_limit_less_used_not_counting_the_page_cache(tmp_path):
    proc = fake_proc(tmp_path, ["9:name=systemd:/", "4:memory:/job/arm", "0::/"])
    cgroups = tmp_path / "cgroup"
    v1_files(cgroups / "memory", 9223372036854771712, 10 * GiB, 0)  # the root: no limit
    v1_files(cgroups / "memory" / "job", 9223372036854771712, 2 * GiB, 0)
    # 1.5 GiB used of which 1 GiB page cache (0.25 GiB of it shmem, 0.125 GiB mapped: neither can be dropped)
    v1_files(cgroups / "memory" / "job" / "arm", 2 * GiB, 3 * GiB // 2, GiB, shmem=GiB // 4, mapped=GiB // 8)
    limit = memory_limit(proc, cgroups)
    used = 3 * GiB // 2 - (GiB - GiB // 4 - GiB // 8)
    assert limit.limit_bytes == 2 * GiB
    assert limit.available_bytes == 2 * GiB - used
    assert limit.source == f"cgroup v1 {cgroups / 'memory' / 'job' / 'arm'}"


def test_cgroup_v1_parent_limit_is_tighter(tmp_path):
    proc = fake_proc(tmp_path, ["4:memory,hugetlb:/a/b"])
    cgroups = tmp_path / "cgroup"
    v1_files(cgroups / "memory" / "a", GiB, GiB // 2, 0)  # the parent: 1 GiB, half of it used
    v1_files(cgroups / "memory" / "a" / "b", 4 * GiB, GiB // 4, 0)
    limit = memory_limit(proc, cgroups)
    assert (limit.limit_bytes, limit.available_bytes) == (GiB, GiB // 2)
    assert limit.source.endswith(str(Path("memory") / "a"))


def test_cgroup_v2_memory_max(tmp_path):
    proc = fake_proc(tmp_path, ["0::/user.slice/job"], available=20 * GiB)
    cgroups = tmp_path / "cgroup"
    cgroups.mkdir()
    (cgroups / "cgroup.controllers").write_text("cpu memory\n")
    job = cgroups / "user.slice" / "job"
    job.mkdir(parents=True)
    (cgroups / "user.slice" / "memory.max").write_text("max\n")
    (job / "memory.max").write_text(f"{3 * GiB}\n")
    (job / "memory.current").write_text(f"{GiB}\n")
    (job / "memory.stat").write_text(f"anon 100\nfile {GiB // 2}\nfile_mapped {GiB // 4}\nshmem 0\n")
    limit = memory_limit(proc, cgroups)
    assert (limit.limit_bytes, limit.available_bytes) == (3 * GiB, 3 * GiB - GiB // 2 - GiB // 4)
    assert limit.source == f"cgroup v2 {job}"


def test_mem_available_below_the_cgroup_room_wins(tmp_path):
    proc = fake_proc(tmp_path, ["4:memory:/x"], available=GiB)
    cgroups = tmp_path / "cgroup"
    v1_files(cgroups / "memory" / "x", 8 * GiB, 0, 0)
    limit = memory_limit(proc, cgroups)
    assert (limit.limit_bytes, limit.available_bytes) == (8 * GiB, GiB)


def test_this_machine_reads_without_error():
    limit = memory_limit()
    assert 0 < limit.available_bytes <= limit.limit_bytes


# -- sizing ------------------------------------------------------------------------------------------

LAYERS = 20
COMPRESSED, DENSE = 228 * MiB, 386 * MiB  # a 7B-shaped INT8 layer and its bf16 weights


def usable(available: int) -> int:
    return int(available * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES


def sized(available: int, **config):
    memory = MemoryLimit(available, available, "cgroup v1 /test")
    return size_for_memory([COMPRESSED] * LAYERS, [DENSE] * LAYERS, EngineConfig(**config), "cpu", memory)


def test_a_model_that_fits_stays_resident_as_before():
    sizing = sized(64 * GiB)
    assert sizing.config.prefetch_depth == 2
    plan = plan_tiers([COMPRESSED] * LAYERS, [DENSE] * LAYERS, 2, sizing.device_budget_bytes, None,
                      sizing.host_budget_bytes)
    assert plan.device == tuple(range(LAYERS)) and not plan.streamed


@pytest.mark.parametrize("available, depth", [(3 * GiB, 2), (int(1.8 * GiB), 1), (GiB, 0)])
def test_prefetch_depth_lowered_to_the_slots_the_memory_holds(available, depth):
    sizing = sized(available)
    slot = COMPRESSED + DENSE
    assert sizing.slot_bytes == slot
    assert sizing.config.prefetch_depth == depth == min(2, usable(available) // slot - 1)
    plan = plan_tiers([COMPRESSED] * LAYERS, [DENSE] * LAYERS, depth, sizing.device_budget_bytes, None,
                      sizing.host_budget_bytes)
    resident = sum(DENSE for _ in plan.device)
    host = sum(COMPRESSED for _ in plan.host)
    assert (depth + 1) * slot + resident + host <= usable(available)  # never beyond the limit
    assert plan.disk  # the model is larger than the memory: the rest comes from disk


def test_layers_held_in_their_blocks_are_planned_at_what_they_hold():
    """On the CPU a layer whose products run from its blocks holds its file bytes, resident or in a
    slot, not a dense copy: more layers stay resident and the slots are smaller (issue 24, Q4_0)."""
    available, norms = 3 * GiB, 64 * 1024
    memory = MemoryLimit(available, available, "cgroup v1 /test")
    held = [COMPRESSED + norms] * LAYERS
    sizing = size_for_memory([COMPRESSED] * LAYERS, [norms] * LAYERS, EngineConfig(), "cpu", memory, held)
    assert sizing.slot_bytes == COMPRESSED + norms and sizing.config.prefetch_depth == 2
    plan = plan_tiers([COMPRESSED] * LAYERS, [norms] * LAYERS, 2, sizing.device_budget_bytes, None,
                      sizing.host_budget_bytes, held)
    before = plan_tiers([COMPRESSED] * LAYERS, [DENSE] * LAYERS, 2, sized(available).device_budget_bytes, None,
                        sized(available).host_budget_bytes)
    assert len(plan.device) > len(before.device) and len(plan.device) + len(plan.host) > len(before.device) + len(before.host)
    assert 3 * sizing.slot_bytes + len(plan.device) * (COMPRESSED + norms) + len(plan.host) * COMPRESSED <= usable(available)


def test_layers_in_their_blocks_stay_resident_where_all_fit_the_usable_memory():
    """Held in their blocks, the layers that fit the usable memory (not only half of it) are all
    resident and nothing streams; one layer more and the slots come first, the rest resident, no host
    tier (it would hold the same bytes as resident layers and pass each through a slot)."""
    norms = 64 * 1024
    held = [COMPRESSED + norms] * LAYERS
    total = sum(held)
    for available, streams in ((int((total + HEADROOM_BYTES) / (1 - HEADROOM_FRACTION)) + MiB, False),
                               (int((total + HEADROOM_BYTES) / (1 - HEADROOM_FRACTION)) - 2 * COMPRESSED, True)):
        memory = MemoryLimit(available, available, "cgroup v1 /test")
        sizing = size_for_memory([COMPRESSED] * LAYERS, [norms] * LAYERS, EngineConfig(), "cpu", memory, held)
        plan = plan_tiers([COMPRESSED] * LAYERS, [norms] * LAYERS, sizing.config.prefetch_depth,
                          sizing.device_budget_bytes, None, sizing.host_budget_bytes, held)
        assert total > usable(available) // 2 and bool(plan.streamed) == streams
        if streams:
            slots = (sizing.config.prefetch_depth + 1) * sizing.slot_bytes
            assert not plan.host and len(plan.device) == (usable(available) - slots) // (COMPRESSED + norms)
            assert slots + sum(held[i] for i in plan.device) <= usable(available)
        else:
            assert plan.device == tuple(range(LAYERS))


def test_too_little_memory_for_one_slot_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"one streaming slot needs 614\.0 MiB .* raise the memory limit"):
        sized(600 * MiB)


def test_explicit_budgets_are_kept():
    sizing = sized(3 * GiB, host_memory="1GiB", gpu_memory=0)
    assert sizing.host_budget_bytes == GiB and sizing.device_budget_bytes is None


def test_the_engine_says_its_memory_plan(tiny_stores, capsys):
    from endor_ray.engine.engine import Engine

    with Engine(str(tiny_stores["llama-gqa"]), EngineConfig(device="cpu", gpu_memory=0), progress=True) as engine:
        note = engine.model_runner.memory_note
        assert engine.plan.streamed  # gpu_memory=0: every layer streams
    assert "memory limit" in note and "slots of" in note and "host tier" in note
    assert note in capsys.readouterr().err


# -- the page cache ---------------------------------------------------------------------------------

def cached_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(subprocess.run(["which", "fincore"], capture_output=True).returncode != 0, reason="no fincore")
def test_buffered_reads_drop_the_pages_they_read_unless_kept(tmp_path):
    path = tmp_path / "layer.bin"
    data = os.urandom(8 * MiB)
    path.write_bytes(data)
    os.sync()
    buffer = torch.empty(len(data), dtype=torch.uint8)
    read_local(str(path), buffer, len(data))
    assert cached_bytes(path) >= len(data) // 2  # kept (what `--disk-io cached` does)
    read_local(str(path), buffer, len(data), drop_cache=True)
    assert cached_bytes(path) == 0
    assert bytes(buffer.numpy()) == data
