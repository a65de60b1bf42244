"""Offline teacher logits: the teacher's top-K logits per token, written once, read by every
later distillation on the same data, so the teacher need not be in memory beside the student.

The cache follows the training batches exactly: the same packed stream, seed, global batch and
sequence length give the same rows, so update s (1-based) reads entry s - 1, and a resumed run
(whose data position is its step) reads on from where it stopped. Each process writes and reads
only its own rows of every batch (its `process_<i>/` shard), as the training data is read.

Layout (zarr arrays through tensorstore; `K` = `k`, `R` = rows of this process):

    meta.json                       k, vocab, seq_len, global_batch_size, seed, processes, dtype
    process_<i>/tokens              (steps, R, T) int32: checked against every training batch
    process_<i>/values              (steps, R, T, K) float32 or bfloat16: top-K logits
    process_<i>/indices             (steps, R, T, K) int32: their vocabulary ids
    process_<i>/written.json        {"steps": n}: entries complete on disk (resume point)

Bytes per token: K x (value bytes + 4) + 4. The loss (`losses.topk_kl_bt`, through the
step's `step.CachedTopK` targets) is the forward KL of
`losses.forward_kl_bt` with `top_k=K`: the teacher distribution renormalised over its top K,
the student's full-vocabulary log-probabilities at those ids; with float32 values the two agree
to rounding.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from minitron_jax import model as M
from minitron_jax import sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.distill import losses as distill
from minitron_jax.distill import step as train

VALUE_DTYPES = ("float32", "bfloat16")
CACHE_KEYS = distill.TOPK_KEYS
_META_KEYS = ("k", "vocab_size", "seq_len", "global_batch_size", "seed", "process_count")


def bytes_per_token(k: int, dtype: str = "float32") -> int:
  """Cache bytes per training token: K values, K int32 ids and the int32 token."""
  return k * (np.dtype(jnp.dtype(dtype)).itemsize + 4) + 4


# ---------------------------------------------------------------------------- storage


def _spec(path: str, shape, dtype: str, create: bool) -> dict:
  spec: dict[str, Any] = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  if create:
    chunks = [1, *shape[1:]]
    spec.update(create=True, open=True,
                metadata={"shape": list(shape), "chunks": chunks, "dtype":
                          {"float32": "<f4", "bfloat16": "bfloat16", "int32": "<i4"}[dtype]})
  return spec


class TeacherCache:
  """One process's shard of a cache directory, for writing or reading."""

  def __init__(self, directory: str, process_index: int | None = None):
    self.directory = directory
    self.process_index = jax.process_index() if process_index is None else process_index
    self.shard = os.path.join(directory, f"process_{self.process_index}")
    self._arrays: dict[str, Any] = {}

  # -- metadata
  def meta(self) -> dict:
    path = os.path.join(self.directory, "meta.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: not a teacher cache")
    with open(path) as f:
      return json.load(f)

  def written(self) -> int:
    path = os.path.join(self.shard, "written.json")
    if not os.path.isfile(path):
      return 0
    with open(path) as f:
      return int(json.load(f)["steps"])

  def _set_written(self, n: int) -> None:
    tmp = os.path.join(self.shard, "written.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"steps": n}, f)
    os.replace(tmp, os.path.join(self.shard, "written.json"))

  def check(self, cfg: train.TrainConfig, vocab_size: int, steps: int) -> dict:
    """Raises ValueError naming the setting when this cache does not follow `cfg`'s batches."""
    meta = self.meta()
    want = {"vocab_size": vocab_size, "seq_len": cfg.seq_len,
            "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
            "process_count": jax.process_count()}
    for key, v in want.items():
      if meta[key] != v:
        raise ValueError(f"{self.directory}: the teacher cache has {key}={meta[key]}, this run "
                         f"{v}")
    have = self.written()
    if have < steps:
      raise ValueError(f"{self.directory}: the teacher cache holds {have} steps of process "
                       f"{self.process_index}, the run needs {steps} (write one for this run)")
    return meta

  def _open(self, name: str, shape=None, dtype=None):
    if name not in self._arrays:
      import tensorstore as ts

      create = shape is not None
      self._arrays[name] = ts.open(_spec(os.path.join(self.shard, name), shape, dtype,
                                         create)).result()
    return self._arrays[name]

  # -- reading
  def read(self, index: int) -> dict[str, np.ndarray]:
    """Entry `index` (0-based update) of this process: tokens, topk_values, topk_indices."""
    return {"tokens": np.asarray(self._open("tokens")[index].read().result()),
            "topk_values": np.asarray(self._open("values")[index].read().result()),
            "topk_indices": np.asarray(self._open("indices")[index].read().result())}


def write(directory: str, teacher_params, teacher_cfg: LlamaConfig, dataset, steps: int,
          k: int, cfg: train.TrainConfig, dtype: str = "float32", process_index: int = 0,
          log: Callable[[str], None] = print) -> TeacherCache:
  """Writes (or continues) the top-`k` teacher logits of `steps` batches of `dataset`.

  `dataset` is the `pipeline.Loader` a training run with `cfg` would read, from its start;
  entries already on disk are skipped (the data position is the entry count), so an interrupted
  write resumes. Each process runs the teacher on its own rows.
  """
  if dtype not in VALUE_DTYPES:
    raise ValueError(f"cache dtype {dtype!r} is not one of {VALUE_DTYPES}")
  if not 1 <= k <= teacher_cfg.vocab_size:
    raise ValueError(f"top-k={k} of the cache must be in [1, {teacher_cfg.vocab_size}]")
  cache = TeacherCache(directory, process_index)
  meta = {"k": k, "vocab_size": teacher_cfg.vocab_size, "seq_len": cfg.seq_len,
          "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
          "process_count": jax.process_count(), "dtype": dtype}
  meta_path = os.path.join(directory, "meta.json")
  if os.path.isfile(meta_path):
    old = cache.meta()
    bad = [key for key in _META_KEYS + ("dtype",) if old.get(key) != meta[key]]
    if bad:
      raise ValueError(f"{directory}: an existing teacher cache has other settings ({bad[0]}="
                       f"{old.get(bad[0])}, now {meta[bad[0]]}); use a new directory")
  os.makedirs(cache.shard, exist_ok=True)
  if process_index == 0 and not os.path.isfile(meta_path):
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f)
    os.replace(tmp, meta_path)
  rows, t = dataset.local_batch_size, cfg.seq_len
  tokens = cache._open("tokens", (steps, rows, t), "int32")
  values = cache._open("values", (steps, rows, t, k), dtype)
  indices = cache._open("indices", (steps, rows, t, k), "int32")
  if tokens.shape[0] < steps:
    raise ValueError(f"{directory}: the cache was made for {tokens.shape[0]} steps; use a new "
                     "directory for more")
  start = cache.written()
  for _ in range(start):  # the data position of entry `start`
    next(dataset)
  topk = _topk_fn(teacher_cfg.replace(dtype=cfg.dtype), k, dtype)
  for i in range(start, steps):
    b = next(dataset)
    v, idx = topk(teacher_params, *(np.asarray(b[key], np.int32) for key in train.BATCH_KEYS))
    tokens[i].write(np.asarray(b["tokens"], np.int32)).result()
    values[i].write(np.asarray(v)).result()
    indices[i].write(np.asarray(idx)).result()
    cache._set_written(i + 1)
    if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
      log(f"teacher cache: {i + 1}/{steps} steps written")
  return cache


def _topk_fn(tcfg: LlamaConfig, k: int, dtype: str):
  def f(params, tokens_bt, segment_ids_bt, positions_bt):
    logits = M.forward(params, tcfg, tokens_bt, positions_bt=positions_bt,
                       segment_ids_bt=segment_ids_bt)["logits"].astype(jnp.float32)
    v, idx = jax.lax.top_k(logits, k)
    return v.astype(dtype), idx.astype(jnp.int32)
  return jax.jit(f)


# ---------------------------------------------------------------------------- training


def batch_with_cache(local: dict[str, np.ndarray], entry: dict[str, np.ndarray], mesh,
                     cfg: train.TrainConfig, index: int) -> dict[str, jax.Array]:
  """The training batch plus its cached top-K, as global arrays in the step's layout."""
  if not np.array_equal(np.asarray(local["tokens"], np.int32), entry["tokens"]):
    raise ValueError(f"teacher cache entry {index} holds other tokens than this run's batch "
                     f"{index + 1}: the data differs from the data the cache was written for")
  out = train.global_batch(local, mesh, cfg)
  a = cfg.accum_steps
  row = sharding.logical_to_spec(("batch",), mesh=mesh)[0]
  s = NamedSharding(mesh, P(None, row, None, None))
  for key in CACHE_KEYS:
    x = entry[key]
    rows, t, k = x.shape
    x = x.reshape(rows // a, a, t, k).transpose(1, 0, 2, 3)
    out[key] = jax.make_array_from_process_local_data(s, x, (a, cfg.micro, t, k))
  return out


def write_for_run(directory: str, cfg: train.TrainConfig, teacher_params,
                  teacher_cfg: LlamaConfig, train_tokens, k: int, dtype: str = "float32",
                  pad_id: int = 0, log: Callable[[str], None] = print) -> dict:
  """Writes the cache of the `cfg.steps` batches a `run.fit` with `cfg` on `train_tokens` reads
  (the same mesh-derived row split, so each process writes the rows it will train on).

  Returns a summary: the directory, K, steps, dtype, bytes per token and seconds.
  """
  import time

  from minitron_jax.data import pipeline

  t0 = time.perf_counter()
  mesh = sharding.make_mesh(cfg.mesh)
  index, count = train.batch_rows(mesh, cfg)
  dataset = pipeline.training_loader(train_tokens, seq_len=cfg.seq_len,
                                     global_batch_size=cfg.global_batch_size, seed=cfg.seed,
                                     pad_id=pad_id, process_index=index, process_count=count,
                                     num_workers=cfg.data_workers)
  with dataset:
    write(directory, teacher_params, teacher_cfg, dataset, cfg.steps, k, cfg, dtype,
          process_index=jax.process_index(), log=log)
  summary = {"teacher_cache": os.path.abspath(directory), "k": k, "steps": cfg.steps,
             "dtype": dtype, "bytes_per_token": bytes_per_token(k, dtype),
             "seconds": round(time.perf_counter() - t0, 2)}
  log(f"wrote the teacher cache {directory}: {cfg.steps} steps, {summary['bytes_per_token']} "
      "bytes per token")
  return summary
