"""Continuous batching: the scheduler's admission rule, and the engine's exactness whatever a
sequence shares its passes with, whenever it joins or others leave (against transformers' own
generate on the same weights, one prompt at a time)."""

import threading

import torch

import pytest

from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.reference import reference_greedy
from endor_ray.engine.loop import EngineLoop
from endor_ray.engine.sampling import SamplingParams
from endor_ray.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from endor_ray.engine.sequence import Sequence
from endor_ray.errors import ConfigError

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def add(a, b):",
    "Hi",
    "Rain falls on the",
    "1, 2, 3, 4,",
]


def seq(length: int, max_new: int = 4) -> Sequence:
    return Sequence("x", list(range(length)), SamplingParams(max_new_tokens=max_new))


def test_admission_is_fifo_within_the_limits():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_prefill_tokens=40, max_cache_tokens=100))
    waiting = [seq(10), seq(10), seq(30), seq(5)]
    scheduler.add(waiting)
    first = scheduler.admit([])
    assert first == waiting[:2]  # a third row would make a 3 x 30 block > 40 padded tokens
    assert scheduler.admit(first) == []  # 3 rows x 30 tokens still too many beside them
    assert scheduler.admit([]) == [waiting[2]]  # alone, a long prompt always gets in
    assert scheduler.admit([waiting[2]]) == [waiting[3]]
    scheduler.add([seq(90, max_new=5)])
    assert scheduler.admit([waiting[2]]) == []  # the KV budget: 34 + 95 > 100
    with pytest.raises(ConfigError, match="KV cache"):
        scheduler.add([seq(90, max_new=20)])  # could never fit: told at once


def test_a_full_queue_refuses_and_cancelled_sequences_leave_the_queue():
    scheduler = Scheduler(SchedulerConfig(max_waiting=2))
    waiting = [seq(3), seq(3)]
    scheduler.add(waiting)
    with pytest.raises(QueueFull, match="retry later"):
        scheduler.add([seq(3)])
    waiting[0].cancelled = True
    assert scheduler.admit([]) == []  # cancelled ones are reported before anything is admitted
    assert scheduler.take_cancelled() == [waiting[0]]
    assert scheduler.admit([]) == [waiting[1]]


@pytest.fixture(scope="module", params=["llama-gqa", "opt"])
def engine(request, tiny_stores):
    with Engine(str(tiny_stores[request.param]), EngineConfig(gpu_memory=0), progress=False,
                scheduler=SchedulerConfig(max_num_seqs=4)) as engine:
        yield engine


@pytest.fixture(scope="module")
def solo(engine):
    return [reference_greedy(engine, [prompt], 8)[0] for prompt in PROMPTS]


def test_staggered_arrivals_give_each_sequence_its_solo_answer(engine, solo):
    """Joins at passes 0, 2, 3 and 5, an early stop, more sequences than a pass holds (4)."""
    arrivals = {0: [0], 2: [1, 2], 3: [3], 5: [4, 5]}
    lengths = [8, 8, 8, 3, 8, 8]
    sequences, step, sizes = {}, 0, []
    while step < 6 or engine.has_work:
        for index in arrivals.get(step, []):
            [sequences[index]] = engine.new_sequences([PROMPTS[index]], SamplingParams(max_new_tokens=lengths[index]))
            engine.add([sequences[index]])
        engine.step()
        sizes.append(len(engine.batch.rows))
        step += 1
    assert max(sizes) == 4  # the pass limit held, and was reached
    for index, sequence in sequences.items():
        assert sequence.output_ids == solo[index][:lengths[index]], index
    assert engine.batch.columns == 0 and engine.batch.cache is None  # nothing left behind


def test_rows_handed_back_for_a_later_request_finish_with_their_solo_answer(engine, solo):
    """Preemption by recompute: a request alone holds every row; when another arrives, its rows over
    the share leave the batch (their cache with them) and rejoin later, their prompt and the tokens
    generated so far prefilled again, and every sequence still gets its solo answer."""
    scheduler, engine.scheduler = engine.scheduler, Scheduler(SchedulerConfig(max_num_seqs=4, max_seqs_per_request=1))
    preempted_before = engine.metrics.preempted
    try:
        big = engine.new_sequences(PROMPTS[:3], SamplingParams(max_new_tokens=8))
        engine.add(big)
        engine.step()
        engine.step()
        assert len(engine.batch.rows) == 3 and all(len(s.output_ids) == 2 for s in big)
        [small] = engine.new_sequences([PROMPTS[3]], SamplingParams(max_new_tokens=3))
        engine.add([small])
        shared = []
        while not small.finished:
            engine.step()
            shared.append(len(engine.batch.rows))
        assert engine.metrics.preempted - preempted_before == 2
        assert max(shared) <= 2  # one row of each request while they share
        while engine.has_work:
            engine.step()
        for index, sequence in enumerate(big):
            assert sequence.output_ids == solo[index][:8], index
        assert small.output_ids == solo[3][:3]
    finally:
        engine.scheduler = scheduler


def test_padding_of_a_long_prompt_does_not_stay(engine):
    long, short = engine.new_sequences([PROMPTS[1], PROMPTS[3]], [SamplingParams(max_new_tokens=2),
                                                                    SamplingParams(max_new_tokens=8)])
    engine.add([long, short])
    engine.step()
    engine.step()  # the long prompt's sequence is done and leaves
    assert long.finished and not short.finished
    assert engine.batch.columns == len(short.prompt_ids) + 1  # realigned: no column of the long prompt left
    while engine.has_work:
        engine.step()


def test_one_failing_sequence_does_not_fail_its_neighbours(engine, solo, monkeypatch):
    from endor_ray.engine import engine as engine_module

    real = engine_module.select_token

    def fails_for_seed_666(logits, params, generator):  # a fault injected into one sequence's sampling
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "select_token", fails_for_seed_666)
    good, bad, tiny = engine.new_sequences(
        [PROMPTS[0], PROMPTS[2], PROMPTS[3]],
        [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.0, seed=666),
         SamplingParams(max_new_tokens=6, temperature=1e-40, seed=1)])  # 1e-40: greedy in effect, no NaN
    engine.add([good, bad, tiny])
    while engine.has_work:
        engine.step()
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    assert good.finish_reason == "length" and good.output_ids == solo[0][:6]
    assert tiny.finish_reason == "length" and tiny.output_ids == solo[3][:6]


def test_cancelled_sequences_leave_at_the_next_pass(engine, solo):
    keep, drop = engine.new_sequences([PROMPTS[0], PROMPTS[4]], SamplingParams(max_new_tokens=8))
    engine.add([keep, drop])
    engine.step()
    engine.cancel([drop])
    engine.step()
    assert drop.finish_reason == "cancelled" and len(drop.output_ids) == 1
    assert drop not in engine.batch.rows
    while engine.has_work:
        engine.step()
    assert keep.output_ids == solo[0]


def test_a_stream_whose_consumer_stops_frees_its_sequences(engine):
    events = engine.stream([PROMPTS[0]], SamplingParams(max_new_tokens=8))
    next(events)
    events.close()  # the consumer went away
    assert not engine.has_work


def test_stream_data_sends_the_events_the_engine_loop_sends(engine, solo):
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, logprobs=2)]
    direct = list(engine.stream_data(PROMPTS[:2], params))
    data_stream = engine.stream_data(PROMPTS[:1], params[0])
    next(data_stream)
    data_stream.close()  # a consumer that stops frees its sequences here too
    assert not engine.has_work
    loop = EngineLoop(engine)
    try:
        looped = list(loop.submit(PROMPTS[:2], params).events(timeout_s=120))
    finally:
        loop.close()
    assert [event for event in direct if "completions" not in event] == looped[:-1]
    assert direct[-1]["completions"] == looped[-1]["completions"] and direct[-1].keys() == looped[-1].keys()
    finished = [event["completion"]["token_ids"] for event in direct if "completion" in event]
    assert sorted(finished) == sorted(solo[:2]) and any("logprob" in event for event in direct)


def test_the_engine_loop_serves_requests_from_threads(engine, solo):
    loop = EngineLoop(engine)
    try:
        results, errors = {}, []

        def ask(index: int) -> None:
            try:
                request = loop.submit([PROMPTS[index]], SamplingParams(max_new_tokens=8))
                *_, final = request.events(timeout_s=120)
                results[index] = final["completions"][0]["token_ids"]
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not errors
        assert results == {index: solo[index] for index in range(len(PROMPTS))}
        assert loop.stats()["mean_sequences_per_pass"] > 1

        request = loop.submit([PROMPTS[1]], SamplingParams(max_new_tokens=8))
        first = next(request.events(timeout_s=60))
        loop.cancel(request)
        *_, final = request.events(timeout_s=60)
        assert "token_id" in first and final["completions"][0]["finish_reason"] == "cancelled"
        with pytest.raises(ConfigError, match="context"):
            loop.submit(["word " * 200], SamplingParams(max_new_tokens=8))  # refused at once, in this thread
    finally:
        loop.close()


def test_fp32_compute_over_a_bf16_store_is_batch_invariant(tiny_checkpoints, smollm2_dir, tmp_path):
    """bf16 rounding depends on the batch's shape; computing in fp32 (the same bytes moved) does not
    (measured on the SmolLM2 demo store: 8 of 12 chat answers changed in a batch in bf16, none in fp32)."""
    import shutil

    from endor_ray.compress.convert import ConvertConfig, convert

    from conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ckpt", "llama-gqa", vocab_size=49152)
    for path in smollm2_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copy(path, checkpoint / path.name)
    store = convert(str(checkpoint), tmp_path / "bf16", ConvertConfig(method="magnitude", dtype="bfloat16",
                                                                      block_size=256), progress=False)
    params = SamplingParams(max_new_tokens=6)
    with Engine(str(store), EngineConfig(gpu_memory=0, compute_dtype="float32"), progress=False) as engine:
        assert engine.model.dtype == torch.float32
        solo = [engine.generate([prompt], params).completions[0].token_ids for prompt in PROMPTS]
        batched = [c.token_ids for c in engine.generate(PROMPTS, params).completions]
        reference = reference_greedy(engine, PROMPTS[:1], 6)  # transformers on the widened weights
    assert batched == solo and solo[0] == reference[0]
