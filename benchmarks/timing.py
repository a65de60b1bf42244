"""The one timer every benchmark uses: best wall time after a warm-up call."""

import time

import jax


def best_seconds(fn, repeats: int) -> float:
  """Best wall time of `fn()` over `repeats` calls after one untimed warm-up (compilation,
  first allocations), blocking on JAX results so asynchronous dispatch is not mistaken for
  speed."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t0)
  return best
