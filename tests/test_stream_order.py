"""The layer source's CUDA ordering, checked without a GPU.

`LayerSource`'s real code runs with `tests/cuda_model.py` in place of `torch.cuda`: every copy,
decompression, compute and host write of a slot buffer is checked against happens-before. The
intact code must be race-free over several passes; removing any one of its waits must be caught.
"""

import pytest
import torch

from cuda_model import CudaModel
from endor_ray.engine.config import EngineConfig
from endor_ray.engine.layer_source import LayerSource
from endor_ray.engine.readers import StoreReader
from endor_ray.engine.tiers import TierPlan
from endor_ray.format import decode
from endor_ray.store import Store


class RecordingReader(StoreReader):
    """The real store reader; the model is told when it writes the buffer it was lent."""

    def resolve(self, layer_idx, buffer):
        if layer_idx not in self._host:
            self.ops.host_access(f"read of layer {layer_idx}", writes=[buffer])
        return super().resolve(layer_idx, buffer)


class PageableReader(RecordingReader):
    """Hands over memory of its own that is not pinned, as the Ray reader does (object-store
    buffers): the layer source must stage it through the slot's pinned buffer."""

    def resolve(self, layer_idx, buffer):
        data, tier = super().resolve(layer_idx, torch.empty_like(buffer))
        return data.clone(), "remote"


def run_passes(store_path, model: CudaModel, reader_class=RecordingReader, passes: int = 3,
               prefetch_depth: int = 1) -> int:
    """The engine's use of a layer source: acquire, compute on the current stream, release."""
    store = Store(str(store_path))
    plan = TierPlan(device=(0,), host=(1,), disk=tuple(range(2, store.num_layers)))
    expected = {idx: {name: decode(enc) for name, enc in store.layer_tensors(idx).items()}
                for idx in range(store.num_layers)}
    reader = reader_class(store, plan.host, ops=model, progress=False)
    source = LayerSource(reader, plan, torch.device("cpu"), EngineConfig(prefetch_depth=prefetch_depth, fetch_timeout_s=60),
                         progress=False, ops=model)
    computed = 0
    try:
        for _ in range(passes):
            for layer_idx in range(store.num_layers):
                weights = source.acquire(layer_idx)
                model.compute(f"compute of layer {layer_idx}", list(weights.values()))
                assert all(torch.equal(weights[name], expected[layer_idx][name]) for name in weights)
                source.release(layer_idx)
                computed += 1
        stats = source.reset_stats()
        assert sum(stats.hits.values()) == passes * (store.num_layers - 1)  # all but the resident layer
    finally:
        source.close()
    return computed


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_checkpoints):
    from endor_ray.compress.convert import ConvertConfig, convert

    overrides = tmp_path_factory.mktemp("deep")
    from conftest import make_checkpoint

    checkpoint = make_checkpoint(overrides / "ckpt", "llama-gqa", num_hidden_layers=6)
    return convert(str(checkpoint), overrides / "store", ConvertConfig(method="magnitude", block_size=256), progress=False)


@pytest.mark.parametrize("reader_class", [RecordingReader, PageableReader])
@pytest.mark.parametrize("prefetch_depth", [0, 1, 3])
def test_intact_ordering_is_race_free(store_path, reader_class, prefetch_depth):
    model = CudaModel()
    assert run_passes(store_path, model, reader_class, prefetch_depth=prefetch_depth) == 18
    assert model.races == []
    assert model.accesses > 100


# Each wait the layer source issues, and the race it prevents.
WAITS = {
    "ready@compute": "compute reads weights before their decompression",
    "copied@decompress": "decompression reads the compressed buffer before the copy into it",
    "free@decompress": "decompression overwrites weights the compute is still reading",
    "ready@copy": "the copy overwrites the compressed buffer the last decompression is reading",
    "host_free@host": "the reader overwrites the host buffer the last copy is reading",
}


@pytest.mark.parametrize("reader_class", [RecordingReader, PageableReader])
@pytest.mark.parametrize("wait", list(WAITS))
def test_removing_any_wait_is_caught(store_path, wait, reader_class):
    model = CudaModel(drop={wait})
    run_passes(store_path, model, reader_class)
    assert model.dropped[wait] > 0, f"the layer source never waits on {wait}"
    assert model.races, f"no race found without {wait}: {WAITS[wait]}"


def test_events_are_bounded_per_slot(store_path):
    """Timing events are owned by the slots: a long generation creates no more of them."""
    counts = []
    for passes in (1, 8):
        model = CudaModel()
        run_passes(store_path, model, passes=passes, prefetch_depth=1)
        counts.append(model.events_created)
    assert counts[0] == counts[1] == 2 * (4 + 2 * 7)  # 2 slots: 4 ordering events, 2 sets of 7 timings


def test_failed_pinning_unpins_what_was_pinned(store_path):
    """A failure while loading the host tier (layer k) leaves layers 0..k-1 unpinned."""

    class FailingModel(CudaModel):
        def pin(self, tensor):
            if len(self._pinned) == 2:
                raise RuntimeError("cudaHostRegister: out of memory")
            return super().pin(tensor)

    model = FailingModel()
    store = Store(str(store_path))
    with pytest.raises(RuntimeError, match="out of memory"):
        StoreReader(store, (1, 2, 3, 4), ops=model, progress=False)
    assert model._pinned == set()


def test_close_frees_slots_and_stops_threads(store_path):
    import threading

    model = CudaModel()
    store = Store(str(store_path))
    source = LayerSource(StoreReader(store, (), ops=model, progress=False), TierPlan((), (), tuple(range(6))),
                         torch.device("cpu"), EngineConfig(prefetch_depth=2, fetch_timeout_s=60), progress=False, ops=model)
    source.acquire(0)  # schedules prefetches of layers 1 and 2 as well
    source.release(0)
    source.close()
    assert not source._free_slots and not source._prefetcher.in_flight and not source.resident
    assert not [t for t in threading.enumerate() if t.name.startswith(("endor-read", "endor-transfer"))]


def test_the_prefetcher_fetches_ahead_in_order_and_drops_wrong_guesses():
    from endor_ray.utils.prefetch import Prefetcher

    started, dropped, room = [], [], [True]
    prefetcher = Prefetcher([2, 4, 6], depth=2, start=lambda key: started.append(key) or key if room[0] else None,
                            drop=dropped.extend)
    assert prefetcher.claim(2) is None and prefetcher.start(2) == 2
    prefetcher.ahead(2)
    assert started == [2, 4, 6]
    prefetcher.finish(2)
    assert prefetcher.claim(4) == 4
    prefetcher.finish(4)
    prefetcher.ahead(4)  # cyclic: after the last key, the first of the next pass
    assert started == [2, 4, 6, 2] and sorted(prefetcher.in_flight) == [2, 6]
    assert prefetcher.claim(4) is None and sorted(dropped) == [2, 6] and not prefetcher.in_flight  # out of order
    room[0] = False
    prefetcher.ahead(4)  # no room: nothing starts
    assert not prefetcher.in_flight
    room[0] = True
    last = Prefetcher([0, 1, 2], depth=2, start=lambda key: key, drop=dropped.extend, cyclic=False)
    last.ahead(1)
    assert list(last.in_flight) == [2]
