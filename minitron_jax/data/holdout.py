"""Held-out evaluation tokens cut from the tail of a training stream."""

from __future__ import annotations

import numpy as np

from minitron_jax.data import corpus


def split_holdout(stream: corpus.TokenStream, num_tokens: int
                  ) -> tuple[corpus.TokenStream, np.ndarray]:
  """Holds out the tail of a stream for evaluation: (training stream, held-out token ids).

  The cut moves back to a document boundary when one lies in the second half of the stream, so
  held-out documents are unseen whole.
  """
  n = len(stream)
  if num_tokens < 1 or 2 * num_tokens > n:
    raise ValueError(f"cannot hold out {num_tokens} of {n} tokens for evaluation: the corpus "
                     "is too small (lower eval_windows or seq_len, or pass eval data)")
  cut = n - num_tokens
  offsets = np.asarray(stream.offsets)
  bounds = offsets[(offsets >= n // 2) & (offsets <= cut)]
  if len(bounds):
    cut = int(bounds.max())
  train_offsets = np.unique(np.concatenate([offsets[offsets < cut], [cut]])).astype(np.int64)
  tokens = np.asarray(stream.tokens)
  return corpus.TokenStream(tokens[:cut], train_offsets), tokens[cut:]
