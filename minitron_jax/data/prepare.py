"""Tokenizes a source into prepared shards (`data.prepared`) with worker processes.

The source's documents are read in their deterministic order (`corpus`: files, directories,
globs, jsonl, hub datasets, streamed when asked) and cut into shards of `docs_per_shard`
documents; worker processes tokenize whole shards and write them. A shard's bytes depend only
on its documents and the tokenizer, so `num_proc` never changes the output, and a shard whose
record exists is skipped: a killed preparation resumes shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np

from minitron_jax.data import blob, prepared, tokens

SETTINGS = "prepare.json"
_worker_tokenizer = None


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
  """What a preparation reads and how it cuts it.

  Attributes:
    source: anything `corpus.load_texts` reads (a file, directory, glob, jsonl, hub
      `name[:config]`, `shakespeare`).
    text_field: JSON field / dataset column holding the text.
    split: hub dataset split.
    streaming: stream a hub dataset instead of downloading it whole first.
    docs_per_shard: documents per shard (the unit of parallel work and of resuming).
    num_proc: tokenizing processes (1: in this process).
  """
  source: str
  text_field: str = "text"
  split: str = "train"
  streaming: bool = False
  docs_per_shard: int = 4096
  num_proc: int = 1

  def validate(self) -> None:
    from minitron_jax.settings import SettingError

    if not self.source:
      raise SettingError("source", "{name} is empty: name the text to prepare")
    if self.docs_per_shard < 1:
      raise SettingError("docs_per_shard", f"{{name}} must be positive, got {self.docs_per_shard}")
    if self.num_proc < 1:
      raise SettingError("num_proc", f"{{name}} must be positive, got {self.num_proc}")


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
  chunk = []
  for doc in docs:
    chunk.append(doc)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _shard_done(out_dir: str, index: int) -> dict | None:
  """The record of shard `index` when it is complete on disk, else None."""
  path = blob.join(out_dir, prepared.shard_name(index) + ".json")
  if not blob.Blob(path).exists():
    return None
  rec = blob.read_json(path)
  for part in ("tokens", "offsets"):
    if not blob.Blob(blob.join(out_dir, f"{rec['name']}.{part}")).has_size(rec["bytes"][part]):
      return None
  return rec


def write_shard(out_dir: str, index: int, docs: list[str], tokenizer, eos_id: int,
                dtype: np.dtype) -> dict:
  """Tokenizes `docs` and writes shard `index` (data files, then its record); its record."""
  stream = tokens.tokenize_documents(docs, tokenizer, eos_id=eos_id)
  ids = np.asarray(stream.tokens).astype(dtype).tobytes()
  offsets = np.asarray(stream.offsets, prepared.OFFSETS_DTYPE).tobytes()
  name = prepared.shard_name(index)
  for part, data in (("tokens", ids), ("offsets", offsets)):
    blob.write_bytes(blob.join(out_dir, f"{name}.{part}"), data)
  rec = prepared.shard_record(index, ids, offsets, len(docs), dtype)
  blob.write_json(blob.join(out_dir, name + ".json"), rec)
  return rec


def _init_worker(tokenizer) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer


def _work(args) -> dict:
  out_dir, index, docs, eos_id, dtype = args
  return write_shard(out_dir, index, docs, _worker_tokenizer, eos_id, np.dtype(dtype))


def _check_settings(out_dir: str, settings: dict) -> None:
  settings = json.loads(json.dumps(settings))  # as read back (tuples become lists)
  path = blob.join(out_dir, SETTINGS)
  if blob.Blob(path).exists():
    old = blob.read_json(path)
    if old != settings:
      changed = sorted(k for k in settings if old.get(k) != settings[k])
      raise prepared.DataError(f"{out_dir}: holds a preparation of other input or settings "
                               f"({', '.join(changed)} differ); use another --output_dir or "
                               "remove it")
  else:
    blob.write_json(path, settings)


class _Meter:
  def __init__(self):
    self.t0 = self.last = time.perf_counter()
    self.docs = self.tokens = self.shards = 0

  def add(self, rec: dict | None, final: bool = False) -> None:
    if rec is not None:
      self.docs += rec["documents"]
      self.tokens += rec["tokens"]
      self.shards += 1
    now = time.perf_counter()
    if now - self.last >= 2.0 or final:
      self.last = now
      print(f"prepare_data: {self.shards} shards, {self.docs} documents, {self.tokens} tokens "
            f"({self.tokens / max(now - self.t0, 1e-9):.0f} tokens/s)", file=sys.stderr,
            flush=True)


def prepare_documents(spec: PrepareSpec, fingerprint: dict, docs: Iterator[str],
                      output_dir: str | os.PathLike, tokenizer, *, eos_id: int | None = None,
                      tokenizer_name: str = "") -> dict:
  """Prepares the documents of `spec.source` (`corpus.prepare` opens it: `fingerprint` and
  `docs`) into `output_dir`, resuming a killed run; the manifest.

  Raises:
    DataError: the source has no documents, or `output_dir` holds another preparation.
  """
  spec.validate()
  out = os.fspath(output_dir)
  out = out.rstrip("/") if blob.is_remote(out) else os.path.abspath(os.path.expanduser(out))
  eos = tokens.eos_token_id(tokenizer, eos_id)
  dtype = prepared.token_dtype(len(tokenizer))
  settings = {"source": fingerprint, "tokenizer": tokens.tokenizer_fingerprint(tokenizer),
              "eos": eos, "dtype": dtype.str, "docs_per_shard": spec.docs_per_shard}
  blob.makedirs(out)
  _check_settings(out, settings)
  if prepared.is_prepared(out):
    return prepared.read_manifest(out)
  records, meter = {}, _Meter()

  def work() -> Iterator[tuple]:
    for index, chunk in enumerate(_chunks(docs, spec.docs_per_shard)):
      done = _shard_done(out, index)
      if done is not None:  # resumed: this shard was written before the kill
        records[done["name"]] = done
        meter.add(done)
      else:
        yield out, index, chunk, eos, dtype.str

  if spec.num_proc == 1:
    for args in work():
      rec = write_shard(out, args[1], args[2], tokens.encoder(tokenizer), eos, dtype)
      records[rec["name"]] = rec
      meter.add(rec)
  else:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold JAX threads
    with ctx.Pool(spec.num_proc, _init_worker, (tokens.encoder(tokenizer),)) as pool:
      pending = []
      for args in work():
        pending.append(pool.apply_async(_work, (args,)))
        while len(pending) > 2 * spec.num_proc or (pending and pending[0].ready()):
          rec = pending.pop(0).get()
          records[rec["name"]] = rec
          meter.add(rec)
      for p in pending:
        rec = p.get()
        records[rec["name"]] = rec
        meter.add(rec)
  shards = sorted(records.values(), key=lambda r: r["name"])
  return _finish(out, spec, settings, shards, tokenizer_name or
                 getattr(tokenizer, "name_or_path", ""), meter)


def _finish(out: str, spec: PrepareSpec, settings: dict, shards: list[dict], name: str,
            meter: _Meter) -> dict:
  documents = sum(r["documents"] for r in shards)
  if documents == 0:
    raise prepared.DataError(f"{spec.source}: no documents (the source is empty or blank)")
  meter.add(None, final=True)
  manifest = {"format": prepared.FORMAT, "version": prepared.VERSION,
              "tokenizer": {"name": name, "fingerprint": settings["tokenizer"],
                            "eos_id": settings["eos"]},
              "source": settings["source"], "text_field": spec.text_field,
              "dtype": settings["dtype"], "docs_per_shard": spec.docs_per_shard,
              "documents": documents, "tokens": sum(r["tokens"] for r in shards),
              "shards": shards}
  blob.write_json(blob.join(out, prepared.MANIFEST), manifest)
  return manifest
