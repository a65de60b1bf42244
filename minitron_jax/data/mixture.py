"""Distillation data from one or more sources, mixed by weight, with a held-out slice.

Every source's text is cut into documents of at most `max_doc_chars` on paragraph boundaries
(a single `.txt` such as WikiText-2 becomes many documents that shuffle and hold out cleanly).
The last `heldout_chars` of each source are held out whole and never trained on; the rest are
mixed so that each source's share of the training characters equals its weight, using as much
text as the scarcest source allows (no document repeats). Documents carry their source's name
(`{"text", "source"}` jsonl), so a reader can tell what the student was taught.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a mixture: its name (the tag), its documents and its weight (> 0)."""
  name: str
  texts: Sequence[str]
  weight: float = 1.0


def split_documents(text: str, max_chars: int) -> list[str]:
  """Cuts `text` on blank lines into pieces of at most ~`max_chars` (a paragraph longer than
  that stays whole); blank pieces are dropped."""
  if max_chars < 1:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  out, cur, size = [], [], 0
  for para in re.split(r"\n\s*\n", text):
    if not para.strip():
      continue
    if cur and size + len(para) > max_chars:
      out.append("\n\n".join(cur))
      cur, size = [], 0
    cur.append(para)
    size += len(para) + 2
  if cur:
    out.append("\n\n".join(cur))
  return out


def _hold_out(docs: list[str], chars: int) -> tuple[list[str], list[str]]:
  """(training docs, held-out docs): the tail documents that first reach `chars`, at most half
  of the documents."""
  k, total = 0, 0
  while k < len(docs) // 2 and total < chars:
    k += 1
    total += len(docs[-k])
  return docs[:len(docs) - k], docs[len(docs) - k:]


def mix(components: Sequence[Component], *, heldout_chars: int, seed: int = 0,
        max_doc_chars: int = 4000) -> tuple[list[dict], list[dict], dict]:
  """Mixes sources by weight; returns (training records, held-out records, statistics).

  Args:
    components: the sources; names must be unique, weights positive.
    heldout_chars: characters held out from the end of each source (0: none).
    seed: the order of the training documents.
    max_doc_chars: longest document after splitting.

  Raises:
    ValueError: on an empty source, a duplicate name or a non-positive weight.
  """
  names = [c.name for c in components]
  if not components or len(set(names)) != len(names):
    raise ValueError(f"need distinct source names, got {names}")
  bad = [c.name for c in components if not c.weight > 0]
  if bad:
    raise ValueError(f"source weights must be positive: {bad}")
  total_w = sum(c.weight for c in components)
  pools, heldout = {}, []
  for c in components:
    docs = [d for t in c.texts for d in split_documents(t, max_doc_chars)]
    if len(docs) < 2:
      raise ValueError(f"source {c.name!r} has {len(docs)} document(s) after splitting: too "
                       "little text to train on and hold out")
    train, held = _hold_out(docs, heldout_chars) if heldout_chars else (docs, [])
    pools[c.name] = train
    heldout += [{"text": d, "source": c.name} for d in held]
  # The scarcest source (characters per unit of weight) sets the size of the mixture.
  budget = min(sum(map(len, pools[c.name])) * total_w / c.weight for c in components)
  records, stats = [], {}
  for c in components:
    want, used = budget * c.weight / total_w, 0
    for d in pools[c.name]:
      if used >= want:
        break
      records.append({"text": d, "source": c.name})
      used += len(d)
    stats[c.name] = {"weight": c.weight / total_w, "train_chars": used,
                     "heldout_chars": sum(len(r["text"]) for r in heldout
                                          if r["source"] == c.name)}
  # Shuffled held-out documents: the first evaluation windows sample every source.
  rng = np.random.default_rng(seed)
  records = [records[i] for i in rng.permutation(len(records))]
  return records, [heldout[i] for i in rng.permutation(len(heldout))], stats
