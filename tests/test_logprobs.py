"""Log-probabilities and the sampling controls, against transformers' own forward pass."""

import pytest
import torch

from endor_ray.engine import Engine, EngineConfig
from endor_ray.engine.reference import load_dense_model
from endor_ray.engine.sampling import SamplingParams, process_logits
from endor_ray.errors import ConfigError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(tiny_stores):
    with Engine(str(tiny_stores["llama-gqa"]), EngineConfig(gpu_memory=0), progress=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(engine):
    return load_dense_model(engine.store, dtype=engine.dtype).eval()


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)  # [len, vocab]


def test_generated_and_prompt_logprobs_equal_transformers(engine, reference):
    [seq] = engine.new_sequences([PROMPT], SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=2))
    engine.add([seq])
    while engine.has_work:
        engine.step()
    ids = seq.prompt_ids + seq.output_ids
    expected = full_logprobs(reference, ids)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(seq.prompt_ids)
    for position in range(1, len(ids)):
        logprob, alternatives = (seq.prompt_logprobs[position] if position < len(seq.prompt_ids)
                                 else seq.logprobs[position - len(seq.prompt_ids)])
        assert logprob == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        top = torch.topk(expected[position - 1], len(alternatives))
        assert [token for token, _ in alternatives] == top.indices.tolist()
        assert [value for _, value in alternatives] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert len(alternatives) == 3 and len(seq.prompt_logprobs[1][1]) == 2


def test_scoring_only_generates_nothing(engine, reference):
    [seq] = engine.new_sequences([PROMPT], SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    engine.add([seq])
    while engine.has_work:
        engine.step()
    assert seq.output_ids == [] and seq.finish_reason == "length"
    expected = full_logprobs(reference, seq.prompt_ids)
    total = sum(entry[0] for entry in seq.prompt_logprobs[1:])
    assert total == pytest.approx(sum(float(expected[i - 1, t]) for i, t in enumerate(seq.prompt_ids) if i), abs=1e-4)
    with pytest.raises(ConfigError, match="0 only to score"):
        SamplingParams(max_new_tokens=0)


def test_controls_change_the_distribution_as_specified():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(logit_bias=((1, 5.0),), presence_penalty=0.5, frequency_penalty=0.25,
                            repetition_penalty=2.0)
    out = process_logits(logits, params, prompt_ids=[0], output_ids=[3, 3], end_ids={2})
    # token 0: seen in the prompt: 2.0 / 2; token 1: biased; token 3: seen (3.0 / 2), then
    # generated twice: minus 0.25 * 2 + 0.5
    assert out.tolist() == pytest.approx([1.0, 4.0, 0.5, 1.5 - 0.5 - 0.5])
    early = process_logits(logits, SamplingParams(min_tokens=3, stop_token_ids=(0,)), [], [3], end_ids={2})
    assert early[2] == -torch.inf and early[0] == -torch.inf  # EOS and stop tokens wait for min_tokens


def test_stop_token_ids_min_tokens_and_top_k(engine):
    [free] = engine.new_sequences([PROMPT], SamplingParams(max_new_tokens=6))
    engine.add([free])
    while engine.has_work:
        engine.step()
    stop_at = free.output_ids[2]
    [stopped, held] = engine.new_sequences([PROMPT, PROMPT], [SamplingParams(max_new_tokens=6, stop_token_ids=(stop_at,)),
                                                              SamplingParams(max_new_tokens=6, temperature=1.0, top_k=1,
                                                                             seed=3)])
    engine.add([stopped, held])
    while engine.has_work:
        engine.step()
    first_stop = free.output_ids.index(stop_at)
    assert stopped.finish_reason == "stop" and stopped.output_ids == free.output_ids[:first_stop]
    assert held.output_ids == free.output_ids  # top_k=1 sampling is greedy


def test_draw_follows_the_distribution_and_never_draws_a_zero(monkeypatch):
    """Inverse-CDF draws (sampling.draw, which replaced torch.multinomial: ~1.9 ms a draw over 49k ids)
    land on each index as often as its weight says, never on a weight of 0, and refuse what is no
    distribution; the same generator seed gives the same draws."""
    from endor_ray.engine.sampling import draw

    weights = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0], dtype=torch.float64) * 7  # need not sum to 1
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(weights, generator) for _ in range(20000)]), minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    expected = weights / weights.sum() * 20000
    assert bool(((counts.double() - expected).abs() <= 4 * expected.sqrt() + 1).all()), counts  # ~4 sigma
    first, second = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    draws = [draw(weights, first) for _ in range(50)]
    assert draws == [draw(weights, second) for _ in range(50)] and len(set(draws)) == 3
    for bad in ([0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [-0.5, 1.0]):
        with pytest.raises(ValueError, match="invalid distribution"):
            draw(torch.tensor(bad, dtype=torch.float64), generator)
    # u * sum rounded up to the sum: the search runs past the end; the last index with weight, not a zero one
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(1.0, dtype=torch.float64))
    assert draw(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64), generator) == 1
