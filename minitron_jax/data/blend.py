"""Weighted blends of training sources: text, prepared directories and Megatron datasets.

A blend file is a small JSON file naming sources and their weights:

    {"format": "minitron-jax-blend", "version": 1,
     "sources": [{"source": "train.jsonl", "weight": 0.6},
                 {"source": "gs://bucket/prepared", "weight": 0.3},
                 {"source": "/data/pile_text_document", "weight": 0.1}]}

A source is anything `corpus.open_documents` reads (a text source, a prepared directory, local
or in an object store, or a Megatron `.bin` / `.idx` prefix); a relative local path is relative
to the blend file's directory. Each weight is the source's share of the training rows
(`pipeline.Loader` mixes the sources' packed rows). A blend file goes wherever a training or
calibration source goes (`launch/distill.py --data`, the recipe's `data/blend.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

from minitron_jax.data.prepared import DataError

FORMAT = "minitron-jax-blend"
VERSION = 1
_MAX_BYTES = 1 << 20  # a blend file names sources; anything larger is a corpus


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source of a blend and its share of the rows (> 0)."""
  source: str
  weight: float = 1.0


def is_blend(path: str | os.PathLike) -> bool:
  """Whether `path` is a local blend file (a small `.json` file of this format)."""
  p = os.path.expanduser(os.fspath(path))
  if not p.endswith(".json") or not os.path.isfile(p) or os.path.getsize(p) > _MAX_BYTES:
    return False
  try:
    with open(p, encoding="utf-8") as f:
      obj = json.load(f)
  except (ValueError, UnicodeDecodeError):
    return False
  return isinstance(obj, dict) and obj.get("format") == FORMAT


def _resolve(source: str, base: str) -> str:
  if "://" in source or os.path.isabs(os.path.expanduser(source)):
    return source
  return os.path.join(base, source)


def read(path: str | os.PathLike) -> list[Entry]:
  """The entries of a blend file, paths resolved; refuses a malformed file by name."""
  p = os.path.expanduser(os.fspath(path))
  with open(p, encoding="utf-8") as f:
    obj = json.load(f)
  if obj.get("format") != FORMAT or obj.get("version") != VERSION:
    raise DataError(f"{p}: not a {FORMAT} v{VERSION} file")
  raw = obj.get("sources")
  if not isinstance(raw, list) or not raw:
    raise DataError(f"{p}: 'sources' must be a non-empty list")
  entries = []
  for i, e in enumerate(raw):
    if not isinstance(e, dict) or not isinstance(e.get("source"), str):
      raise DataError(f"{p}: source {i} must be an object with a 'source' string")
    entries.append(Entry(_resolve(e["source"], os.path.dirname(os.path.abspath(p))),
                         float(e.get("weight", 1.0))))
  check(entries, where=p)
  return entries


def check(entries: Sequence[Entry], where: str = "the blend") -> None:
  """Refuses an empty blend or a weight that is not a positive finite number."""
  if not entries:
    raise DataError(f"{where}: no sources")
  for e in entries:
    if not (math.isfinite(e.weight) and e.weight > 0):
      raise DataError(f"{where}: source {e.source!r} has weight {e.weight}; weights must be "
                      "positive")


def write(path: str | os.PathLike, entries: Sequence[Entry]) -> None:
  """Writes a blend file atomically (local paths under its directory are kept relative)."""
  from minitron_jax.io import files

  check(entries, where=os.fspath(path))
  base = os.path.dirname(os.path.abspath(os.fspath(path)))
  rows = []
  for e in entries:
    src = e.source
    if "://" not in src and os.path.abspath(src).startswith(base + os.sep):
      src = os.path.relpath(os.path.abspath(src), base)
    rows.append({"source": src, "weight": e.weight})
  files.write_json(os.fspath(path), {"format": FORMAT, "version": VERSION, "sources": rows})


def looks_tokenized(source: str | os.PathLike) -> bool:
  """Whether `source` names token ids rather than text: an object-store URL, a directory
  holding a preparation (finished or interrupted), or a Megatron prefix (`.idx` or `.bin`)."""
  from minitron_jax.data import blob, prepare, prepared

  text = os.fspath(source)
  if blob.is_remote(text):
    return True
  local = os.path.expanduser(text)
  return (any(os.path.isfile(os.path.join(local, f)) for f in (prepared.MANIFEST,
                                                                prepare.SETTINGS))
          or any(os.path.isfile(local + ext) for ext in (".idx", ".bin")))


def token_source_problem(source: str | os.PathLike, tokenizer) -> str | None:
  """Why a prepared directory or Megatron prefix cannot train a model of `tokenizer` (missing,
  interrupted, damaged, another tokenizer's), or None; reads the index, never the tokens."""
  from minitron_jax.data import megatron, prepared, tokens

  text = os.fspath(source)
  try:
    if megatron.is_indexed(text):
      megatron.MegatronSource(text, vocab_size=len(tokenizer))
    else:  # a prepared directory, or the reason it is not one
      prepared.PreparedSource(text, tokenizer_fingerprint=tokens.tokenizer_fingerprint(tokenizer))
  except DataError as e:
    if not megatron.is_indexed(text) and os.path.isfile(os.path.expanduser(text) + ".bin"):
      return f"{text}.idx: missing (a Megatron dataset needs its index beside {text}.bin)"
    return str(e)
  return None


class Blend:
  """The opened sources of a blend (document sources, `corpus.open_documents`) and their
  normalised weights; `pipeline.Loader` mixes their rows.

  Args:
    parts: the document sources.
    weights: one positive weight per part.
    name: the blend file, for messages.
  """

  def __init__(self, parts: Sequence, weights: Sequence[float], name: str = "blend"):
    if len(parts) != len(weights) or not parts:
      raise ValueError(f"{name}: need one weight per source, got {len(weights)} for "
                       f"{len(parts)}")
    total = float(sum(weights))
    self.parts, self.name = list(parts), name
    self.weights = [float(w) / total for w in weights]

  def fingerprint(self) -> dict:
    return {"blend": [[p.fingerprint() if hasattr(p, "fingerprint") else p.name, w]
                      for p, w in zip(self.parts, self.weights)]}
