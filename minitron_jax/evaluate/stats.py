"""The statistics a report needs to say whether a difference is real: standard errors of
accuracies, paired per-window differences of log-perplexity, the fraction of a perplexity gap
that training recovered, and how repetitive a generation is."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def stderr(p: float, n: int) -> float:
  """Standard error of an accuracy `p` over `n` examples, sqrt(p(1-p)/(n-1)), as
  lm-evaluation-harness reports it (0 for n < 2)."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"accuracy must be in [0, 1], got {p}")
  return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """(mean of a - b, its standard error) over paired values, e.g. the mean NLL of each window
  of two models on the same windows. The SE is std(a - b, ddof=1) / sqrt(n); with one pair it
  is infinite (no evidence either way).

  With equal tokens per window the mean difference is the difference of log-perplexities,
  so exp(mean) is the perplexity ratio a / b.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.ndim != 1 or len(d) == 0 or len(a) != len(b):
    raise ValueError(f"need two equally long non-empty sequences, got {len(a)} and {len(b)}")
  if len(d) == 1:
    return float(d[0]), math.inf
  return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def significant(diff: float, se: float, k: float = 2.0) -> bool:
  """Whether a difference exceeds k standard errors (k = 2 by default)."""
  return abs(diff) > k * se


def gap_recovered(ppl_teacher: float, ppl_pruned: float, ppl_trained: float) -> float | None:
  """Fraction of the teacher-pruned gap that training closed, in log-perplexity:
  (log p_pruned - log p_trained) / (log p_pruned - log p_teacher). 1 = back to the teacher,
  0 = no better than pruned, negative = worse; None when pruning cost nothing."""
  lt, lp, ld = math.log(ppl_teacher), math.log(ppl_pruned), math.log(ppl_trained)
  if lp <= lt:
    return None
  return (lp - ld) / (lp - lt)


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 3) -> float:
  """Fraction of the n-grams of `tokens` that occurred earlier in the same sequence: 0 for
  text that never repeats itself, close to 1 for a loop. 0 when there is no n-gram."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  if not grams:
    return 0.0
  seen, repeats = set(), 0
  for g in grams:
    repeats += g in seen
    seen.add(g)
  return repeats / len(grams)
