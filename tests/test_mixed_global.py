"""The whole-model budget chooser against the exact per-layer knapsack."""

import random

import pytest

from endor_ray.compress.mixed import CANDIDATES, Option, choose, choose_global
from endor_ray.errors import ConfigError


def _options(rng: random.Random, tensors: int) -> dict[str, list[Option]]:
    """Options whose error falls roughly exponentially with bytes, as real settings' do."""
    options = {}
    for index in range(tensors):
        scale = rng.uniform(0.1, 10)
        settings = []
        for setting in CANDIDATES[:10]:
            nbytes = rng.randint(100, 2000)
            settings.append(Option(setting, nbytes, scale * 2.0 ** (-nbytes / 250) * rng.uniform(0.7, 1.3)))
        options[f"t{index}"] = settings
    return options


def _error(options, chosen):
    return sum(next(o.error for o in options[name] if o.setting == chosen[name]) for name in options)


def _bytes(options, chosen):
    return sum(next(o.nbytes for o in options[name] if o.setting == chosen[name]) for name in options)


def test_it_fits_and_is_within_a_few_percent_of_the_exact_choice():
    rng = random.Random(1)
    for _ in range(20):
        options = _options(rng, 14)
        least = sum(min(o.nbytes for o in v) for v in options.values())
        most = sum(max(o.nbytes for o in v) for v in options.values())
        for fraction in (0.0, 0.1, 0.3, 0.6, 1.0):
            budget = least + (most - least) * fraction
            chosen = choose_global(options, budget)
            assert _bytes(options, chosen) <= budget
            assert _error(options, chosen) <= 1.05 * _error(options, choose(options, budget)) + 1e-12
            if fraction == 1.0:
                assert _error(options, chosen) == pytest.approx(sum(min(o.error for o in v) for v in options.values()))


def test_an_impossible_budget_is_refused():
    options = _options(random.Random(2), 5)
    least = sum(min(o.nbytes for o in v) for v in options.values())
    with pytest.raises(ConfigError, match="raise --bytes-per-weight"):
        choose_global(options, least - 1)
