"""benchmarks/fidelity.py's paired bootstrap and sign-flip test on hand-made per-sequence losses."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fidelity", Path(__file__).parents[1] / "benchmarks" / "fidelity.py")
fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity)

BASE = [3.1, 3.4, 2.9, 3.3, 3.6, 3.2, 3.0, 3.5]


def test_identical_arms_are_not_different():
    test = fidelity.paired_bootstrap(BASE, BASE)
    assert test["perplexity_diff"] == 0 and test["perplexity_diff_interval"] == [0.0, 0.0]
    assert test["sign_flip_p"] == 1.0 and not test["significant"]


def test_a_shift_on_every_sequence_is_significant():
    test = fidelity.paired_bootstrap([nll + 0.01 for nll in BASE], BASE)
    assert test["perplexity_a"] == pytest.approx(math.exp(sum(BASE) / 8 + 0.01))
    assert test["log_perplexity_diff_interval"] == pytest.approx([0.01, 0.01])
    assert 0 < test["perplexity_diff_interval"][0] <= test["perplexity_diff"] <= test["perplexity_diff_interval"][1]
    assert test["sign_flip_p"] == 2 / 256 and test["significant"]


def test_noise_larger_than_the_shift_is_not_significant():
    noise = [0.05, -0.04, 0.03, -0.06, 0.02, -0.03, 0.04, -0.02]
    test = fidelity.paired_bootstrap([nll + 0.001 + e for nll, e in zip(BASE, noise)], BASE)
    low, high = test["perplexity_diff_interval"]
    assert low < 0 < high and not test["significant"] and test["sign_flip_p"] > 0.5
    assert test == fidelity.paired_bootstrap([nll + 0.001 + e for nll, e in zip(BASE, noise)], BASE)  # fixed seed
