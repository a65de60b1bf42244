"""Token ids of documents: one stream with an EOS after each document, and the tokenizer's
fingerprint that prepared data is keyed by."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Documents as one array: document `i` is `tokens[offsets[i]:offsets[i + 1]]`, EOS last.

  Attributes:
    tokens: (N,) int32 token ids (possibly a read-only memory map of the cache file).
    offsets: (num_documents + 1,) int64, from 0 to N, non-decreasing.
  """
  tokens: np.ndarray
  offsets: np.ndarray

  def __post_init__(self):
    o = self.offsets
    if o.ndim != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.tokens) or np.any(
        o[1:] < o[:-1]):
      raise ValueError("offsets must rise from 0 to len(tokens)")

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def document(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def __len__(self) -> int:
    return len(self.tokens)


def eos_token_id(tokenizer, eos_id: int | None) -> int:
  eos = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS token; pass eos_id")
  return int(eos)


def encoder(tokenizer):
  """What `tokenize_documents` needs of `tokenizer`, cheap to send to a worker process: a fast
  tokenizer's `tokenizers.Tokenizer` backend (a worker then never imports transformers), else
  the tokenizer itself."""
  return getattr(tokenizer, "backend_tokenizer", None) or tokenizer


def _encode(tokenizer, chunk: list[str]) -> list[list[int]]:
  if hasattr(tokenizer, "encode_batch"):  # a `tokenizers.Tokenizer`
    return [e.ids for e in tokenizer.encode_batch(chunk, add_special_tokens=False)]
  # verbose=False: documents longer than the model's context are expected, not a warning.
  return tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                   verbose=False)["input_ids"]


def tokenize_documents(docs: Iterable[str], tokenizer, *, eos_id: int | None = None,
                       chunk_size: int = 256) -> TokenStream:
  """Tokenises documents in chunks (batched calls) and appends EOS to each.

  Args:
    docs: document texts.
    tokenizer: an HF tokenizer, or its `encoder` (then `eos_id` is required); no BOS or other
      special tokens are added.
    eos_id: the separator; default `tokenizer.eos_token_id`.
    chunk_size: documents per tokenizer call (fast tokenizers parallelise within a call).
  """
  eos = eos_token_id(tokenizer, eos_id)
  arrays, chunk = [], []

  def flush():
    for ids in _encode(tokenizer, chunk):
      ids.append(eos)
      arrays.append(np.array(ids, np.int32))
    chunk.clear()

  for doc in docs:
    chunk.append(doc)
    if len(chunk) == chunk_size:
      flush()
  if chunk:
    flush()
  tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)])
  return TokenStream(tokens, offsets.astype(np.int64))


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of everything that decides the ids: the full serialised tokenizer or its vocab."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  payload = backend.to_str() if backend is not None else json.dumps(
      sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(f"{type(tokenizer).__name__}\0{payload}".encode()).hexdigest()


class StreamDocuments:
  """A `TokenStream` read as a document source (`lengths`, `read`), like prepared shards."""

  def __init__(self, stream: TokenStream, name: str = "tokens"):
    self.stream, self.name = stream, name
    self.lengths = np.diff(np.asarray(stream.offsets)).astype(np.int64)

  @property
  def num_documents(self) -> int:
    return len(self.lengths)

  def fingerprint(self) -> dict:
    return {"stream": self.name, "documents": self.num_documents, "tokens": len(self.stream)}

  def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    base = int(self.stream.offsets[doc])
    stop = int(self.lengths[doc]) if stop is None else stop
    return np.asarray(self.stream.tokens[base + start:base + stop], np.int32)

  def all_tokens(self) -> np.ndarray:
    return np.asarray(self.stream.tokens, np.int32)
