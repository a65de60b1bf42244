"""The report's statistics against hand-computed numbers."""

import math

import pytest

from minitron_jax.evaluate import stats


def test_stderr_matches_the_harness_formula():
  # p = 0.6 over 101 examples: sqrt(0.6 * 0.4 / 100) = sqrt(0.0024) = 0.0489898
  assert stats.stderr(0.6, 101) == pytest.approx(0.0489898, abs=1e-7)
  assert stats.stderr(0.5, 5) == pytest.approx(0.25)  # sqrt(0.25 / 4)
  assert stats.stderr(1.0, 50) == 0.0 and stats.stderr(0.3, 1) == 0.0
  with pytest.raises(ValueError, match="accuracy"):
    stats.stderr(1.5, 10)


def test_paired_difference_of_window_nll():
  # differences 0.1, 0.3, 0.2: mean 0.2, sample std 0.1, SE 0.1 / sqrt(3) = 0.057735
  diff, se = stats.paired_difference([2.1, 2.3, 2.2], [2.0, 2.0, 2.0])
  assert diff == pytest.approx(0.2) and se == pytest.approx(0.057735, abs=1e-6)
  assert stats.significant(diff, se)          # 0.2 > 2 * 0.0577
  assert not stats.significant(0.1, 0.06)     # 0.1 < 0.12
  assert stats.paired_difference([1.0], [0.5]) == (0.5, math.inf)
  with pytest.raises(ValueError):
    stats.paired_difference([1.0, 2.0], [1.0])


def test_gap_recovered_in_log_perplexity():
  # teacher e^3, pruned e^6, distilled e^4: (6 - 4) / (6 - 3) = 2/3
  assert stats.gap_recovered(math.e ** 3, math.e ** 6, math.e ** 4) == pytest.approx(2 / 3)
  assert stats.gap_recovered(25.5, 960.0, 25.5) == pytest.approx(1.0)
  assert stats.gap_recovered(25.5, 960.0, 960.0) == pytest.approx(0.0)
  assert stats.gap_recovered(25.5, 960.0, 2000.0) < 0
  assert stats.gap_recovered(30.0, 25.0, 20.0) is None  # pruning cost nothing


def test_repeated_ngram_fraction():
  assert stats.repeated_ngram_fraction([1, 2, 3, 4, 5]) == 0.0
  # 3-grams of 1 2 3 1 2 3 1 2: 123 231 312 123 231 312 => 3 of 6 repeat
  assert stats.repeated_ngram_fraction([1, 2, 3, 1, 2, 3, 1, 2]) == pytest.approx(0.5)
  assert stats.repeated_ngram_fraction([7] * 10) == pytest.approx(7 / 8)
  assert stats.repeated_ngram_fraction([1, 2]) == 0.0
  assert stats.repeated_ngram_fraction([1, 1, 2, 1, 1], n=2) == pytest.approx(0.25)
