"""Perplexity and zero-shot log-likelihood evaluation, batched and jitted on bucketed shapes."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from minitron_jax import model as M, sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.progress import Progress
from minitron_jax.evaluate.generate import bucket
from minitron_jax.evaluate.stats import stderr
from minitron_jax.settings import SettingError


def token_logprobs(params, cfg: LlamaConfig, inputs_bt, targets_bt,
                   chunk: int = M.LOGITS_CHUNK):
  """log p(target_t | inputs_<=t) and whether the target is the argmax, both (B, T); the
  logits exist `chunk` tokens per row at a time (0: all at once)."""
  normed_btd = M.forward(params, cfg, inputs_bt, logits=False)["normed"]
  nll_bt, greedy_bt = M.token_scores_bt(params, cfg, normed_btd, targets_bt, chunk)
  return -nll_bt, greedy_bt


@functools.lru_cache(maxsize=None)
def _scorer(cfg: LlamaConfig, mesh: Mesh | None = None):
  """Jitted (params, inputs, targets, mask) -> (summed log-likelihood, all greedy) per row.

  On a `mesh` the row arrays must be split over the batch axes (`_rows`); the results come
  back replicated, so every host can read them.
  """
  def score(params, inputs_bt, targets_bt, mask_bt):
    lp_bt, greedy_bt = token_logprobs(params, cfg, inputs_bt, targets_bt)
    lp_b = jnp.sum(jnp.where(mask_bt, lp_bt, 0.0), axis=-1)
    greedy_b = jnp.all(greedy_bt | ~mask_bt, axis=-1)
    return lp_b, greedy_b
  return sharding.jit_on(score, mesh)


def _placed(params, cfg: LlamaConfig, mesh: Mesh | None):
  return params if mesh is None else sharding.shard_params(params, cfg, mesh)


def _rows(mesh: Mesh | None, *arrays):
  return arrays if mesh is None else tuple(sharding.shard_rows(a, mesh) for a in arrays)


def text_tokens(tokenizer, text: str) -> list[int]:
  """Token ids of a whole text, no special tokens (`perplexity` adds BOS where it is due);
  verbose=False: a text longer than the model's context is intended here, not a warning."""
  return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def file_tokens(tokenizer, path: str) -> list[int]:
  """`text_tokens` of a UTF-8 text file."""
  with open(path, encoding="utf-8") as f:
    return text_tokens(tokenizer, f.read())


def bos_prefix(tokenizer) -> int | None:
  """The BOS id when the tokenizer puts BOS before every encoded text (Gemma, Llama 3), else
  None (SmolLM2, Qwen): read from what encoding does, as transformers and the harness apply it."""
  bos = tokenizer.bos_token_id
  ids = tokenizer("a", add_special_tokens=True)["input_ids"]
  return bos if bos is not None and len(ids) > 0 and ids[0] == bos else None


def perplexity(params, cfg: LlamaConfig, token_ids: Sequence[int], *, seq_len: int = 1024,
               max_windows: int | None = None, batch_size: int = 4,
               progress: bool = True, mesh: Mesh | None = None,
               bos_id: int | None = None) -> dict:
  """Perplexity over consecutive non-overlapping windows of `seq_len` tokens.

  The last partial window is dropped; every token but the first of each window is predicted.
  With `bos_id` (`bos_prefix` of the tokenizer) each window is BOS then `seq_len - 1` text
  tokens, all of them predicted: the same count, and the context a BOS-trained model expects.
  With a `mesh`, params are sharded by the logical-axis rules and each batch (rounded up to
  a multiple of the batch shards) is split over the batch axes; every host passes the same
  text and feeds only its own rows.

  Returns:
    {"ppl", "nll" (mean), "tokens" (predicted), "windows", "window_nll" (mean NLL of each
    window, for paired comparisons between models on the same windows)}.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  ids = np.asarray(token_ids, np.int32)
  text_len = seq_len if bos_id is None else seq_len - 1
  n_windows = len(ids) // text_len
  if max_windows is not None:
    n_windows = min(n_windows, max_windows)
  if n_windows == 0:
    raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
  windows = ids[: n_windows * text_len].reshape(n_windows, text_len)
  if bos_id is not None:
    windows = np.concatenate([np.full((n_windows, 1), bos_id, np.int32), windows], 1)
  score = _scorer(cfg, mesh)
  params = _placed(params, cfg, mesh)
  batch_size = sharding.padded_rows(batch_size, mesh)
  per_window, bar = [], Progress("perplexity", n_windows, "windows", progress)
  for i in range(0, n_windows, batch_size):
    chunk = windows[i: i + batch_size]
    real = len(chunk)
    if real < batch_size:  # pad the batch, not the shape: one compile
      chunk = np.concatenate([chunk, np.zeros((batch_size - real, seq_len), np.int32)])
    mask = np.zeros((batch_size, seq_len - 1), bool)
    mask[:real] = True
    lp_b, _ = score(params, *_rows(mesh, chunk[:, :-1], chunk[:, 1:], mask))
    per_window += [float(v) for v in np.asarray(lp_b, np.float64)[:real]]
    bar.update(i + real)
  bar.update(n_windows, force=True)
  count = n_windows * (seq_len - 1)
  nll = -sum(per_window) / count
  return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": n_windows,
          "window_nll": [-v / (seq_len - 1) for v in per_window]}


# Zero-shot requests are packed into rows of at least this many tokens (segment ids keep them
# apart), so short requests share a row instead of each padding one to a power of two.
MIN_ROW_TOKENS = 256


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """First-fit decreasing: indices of `lengths` per row, each row's total <= `row_len`."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    if lengths[i] > row_len:
      raise ValueError(f"request of {lengths[i]} tokens does not fit a row of {row_len}")
    for r, room in enumerate(free):
      if lengths[i] <= room:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(row_len - lengths[i])
  return rows


@functools.lru_cache(maxsize=None)
def _packed_scorer(cfg: LlamaConfig, mesh: Mesh | None = None):
  """Jitted (params, inputs, positions, segments, where_n, labels_n) -> (log p, is argmax) of
  `labels_n` after the flat token indices `where_n`: the LM head runs on those tokens only
  (an index may repeat, with another label: requests that share their inputs)."""
  def score(params, inputs_bt, positions_bt, segments_bt, where_n, labels_n):
    normed_btd = M.forward(params, cfg, inputs_bt, positions_bt=positions_bt,
                           segment_ids_bt=segments_bt, logits=False)["normed"]
    x_1nd = normed_btd.reshape(-1, normed_btd.shape[-1])[where_n][None]
    nll_1n, greedy_1n = M.token_scores_bt(params, cfg, x_1nd, labels_n[None], M.LOGITS_CHUNK)
    return -nll_1n[0], greedy_1n[0]
  return sharding.jit_on(score, mesh)


def loglikelihoods(params, cfg: LlamaConfig, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   *, batch_size: int = 16, max_len: int | None = None,
                   progress: Callable[[int], None] | None = None, mesh: Mesh | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Summed log-likelihood of each continuation given its context, and greedy agreement.

  Requests are packed (first-fit decreasing) into rows of their own power-of-two length
  bucket (at least `MIN_ROW_TOKENS`), kept apart by segment ids with positions restarting per request, and
  `batch_size` rows run per call; only the continuation tokens go through the LM head. The
  number of compiled shapes stays logarithmic in the longest request and in the
  continuation tokens per call. Requests longer than `max_len` keep their last `max_len` input
  tokens (the continuation is always kept).

  Args:
    pairs: (context ids, continuation ids); the continuation must be non-empty.
    batch_size: rows per call.
    mesh: shard params and rows as `perplexity` does.

  Returns:
    (loglik float64 (R,), is_greedy bool (R,)).
  """
  max_len = max_len or cfg.max_position_embeddings
  seqs = []
  for ctx, cont in pairs:
    if len(cont) == 0:
      raise ValueError("empty continuation")
    full = list(ctx) + list(cont)
    full = full[-(max_len + 1):]
    seqs.append((full, min(len(cont), len(full) - 1)))
  lls, greedy = np.zeros(len(seqs)), np.ones(len(seqs), bool)
  if not seqs:
    return lls, greedy
  # Requests with the same input tokens (the options of a multiple-choice question with
  # one-token answers, as MMLU's " A".." D") run through the model once.
  users: dict[tuple[int, ...], list[int]] = {}
  for i, (full, _) in enumerate(seqs):
    users.setdefault(tuple(full[:-1]), []).append(i)
  inputs_u = list(users)
  lengths = [len(u) for u in inputs_u]
  # Each request goes into rows of its own power-of-two length: a row's attention spans the
  # whole row, so a short request packed into a row sized for the longest would pay for it.
  groups: dict[int, list[int]] = {}
  for u, n in enumerate(lengths):
    groups.setdefault(max(bucket(n), MIN_ROW_TOKENS), []).append(u)
  score = _packed_scorer(cfg, mesh)
  params = _placed(params, cfg, mesh)
  rows = sharding.padded_rows(batch_size, mesh)
  done = 0
  for row_len, members_g in sorted(groups.items()):
    packed = [[members_g[i] for i in row]
              for row in pack_rows([lengths[u] for u in members_g], row_len)]
    for start in range(0, len(packed), batch_size):
      inputs, positions, segments, where, labels, owner = _packed_batch(
          packed[start: start + batch_size], (rows, row_len), inputs_u, lengths, users, seqs)
      n_where = bucket(len(where), minimum=64)
      where_n, labels_n = np.zeros(n_where, np.int32), np.zeros(n_where, np.int32)
      where_n[:len(where)], labels_n[:len(where)] = where, labels
      lp_n, g_n = score(params, *_rows(mesh, inputs, positions, segments), where_n, labels_n)
      owner_n = np.asarray(owner)
      np.add.at(lls, owner_n, np.asarray(lp_n, np.float64)[:len(owner)])
      np.logical_and.at(greedy, owner_n, np.asarray(g_n)[:len(owner)])
      done += len(set(owner))
      if progress:
        progress(done)
  return lls, greedy


def _packed_batch(packed_rows, shape, inputs_u, lengths, users, seqs):
  """One call's arrays: inputs, positions and segment ids of `packed_rows` (unique-input
  indices per row), and the flat indices, labels and request of every continuation token."""
  inputs = np.zeros(shape, np.int32)
  positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  where, labels, owner = [], [], []
  row_len = shape[1]
  for row, members in enumerate(packed_rows):
    at = 0
    for seg, u in enumerate(members, start=1):
      n = lengths[u]
      inputs[row, at: at + n] = inputs_u[u]
      positions[row, at: at + n] = np.arange(n)
      segments[row, at: at + n] = seg
      for i in users[inputs_u[u]]:
        full, n_cont = seqs[i]
        where += range(row * row_len + at + n - n_cont, row * row_len + at + n)
        labels += full[-n_cont:]
        owner += [i] * n_cont
      at += n
  return inputs, positions, segments, where, labels, owner


def item_scores(name: str, examples, lls: np.ndarray, greedy: np.ndarray
                ) -> tuple[list[bool], list[bool]]:
  """Per example: is the highest summed log-likelihood the gold option (`acc`), and the
  highest per character of the option (`acc_norm`); LAMBADA: greedy agreement (both)."""
  from minitron_jax.evaluate import tasks

  k, acc, acc_norm = 0, [], []
  for ex in examples:
    n = len(ex.requests)
    ll, g = lls[k: k + n], greedy[k: k + n]
    k += n
    if name == "lambada":
      acc.append(bool(g[0]))
      acc_norm.append(bool(g[0]))
      continue
    lengths = np.array([max(tasks.choice_length(r), 1) for r in ex.requests], np.float64)
    acc.append(int(np.argmax(ll)) == ex.label)
    acc_norm.append(int(np.argmax(ll / lengths)) == ex.label)
  return acc, acc_norm


def evaluate_task(params, cfg: LlamaConfig, tokenizer, name: str, data_root: str | None, *,
                  limit: int | None = None, batch_size: int = 16, max_len: int = 1024,
                  progress: bool = True, mesh: Mesh | None = None, num_fewshot: int = 0,
                  mmlu_only_ok: bool = False, per_group: int | None = None) -> dict:
  """Accuracy of one task (see `tasks.TASKS`), zero- or few-shot (`fewshot`).

  Multiple-choice: the option with the highest summed log-likelihood wins (`acc`), or the
  highest log-likelihood per character of the option (`acc_norm`, as lm-evaluation-harness).
  LAMBADA: `acc` is greedy agreement on the target word, `ppl` is exp(-mean log-likelihood).
  MMLU adds the macro-average over subjects (`acc_macro`); `mmlu_only_ok` scores only the
  questions whose label MMLU-Redux confirmed, `per_group` the first N of each subject. The
  data comes from `data_root`, the default local folders or the hub (`sources`); the
  result's `data` says which.
  """
  from minitron_jax.evaluate import fewshot, sources, tasks

  examples = sources.load_prompted(name, data_root, limit=limit, num_fewshot=num_fewshot,
                                   only_ok=mmlu_only_ok and name == "mmlu",
                                   per_group=per_group if name == "mmlu" else None)
  pairs_per_example = tasks.tokenize_requests(examples, tokenizer)
  flat = [pair for pairs in pairs_per_example for pair in pairs]
  bar = Progress(name, len(flat), "requests", progress)
  t0 = time.perf_counter()
  lls, greedy = loglikelihoods(params, cfg, flat, batch_size=batch_size, max_len=max_len,
                               progress=bar.update, mesh=mesh)
  bar.update(len(flat), force=True)
  out = {"examples": len(examples), "seconds": round(time.perf_counter() - t0, 2),
         "data": sources.locate(name, data_root), "num_fewshot": num_fewshot}
  acc, acc_norm = item_scores(name, examples, lls, greedy)
  metrics = tasks.TASK_SPECS[name].metrics
  n = len(examples)
  out["acc"] = sum(acc) / n
  out["acc_stderr"] = stderr(out["acc"], n)
  if "acc_norm" in metrics:
    out["acc_norm"] = sum(acc_norm) / n
    out["acc_norm_stderr"] = stderr(out["acc_norm"], n)
  if "ppl" in metrics:
    out["ppl"] = math.exp(-float(np.mean(lls)))
  if name == "mmlu":
    out.update(fewshot.group_summary([ex.group for ex in examples], acc))
    out["only_ok"] = mmlu_only_ok
  return out


def format_table(rows: list[tuple[str, dict]], columns: Sequence[str]) -> str:
  """A plain-text table: one row per (name, metrics)."""
  header = ["task"] + list(columns)
  body = [[name] + [_fmt(m.get(c)) for c in columns] for name, m in rows]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [header] + body]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
  return str(v)


def run_evaluation(params, cfg: LlamaConfig, tokenizer, task_names: Sequence[str], *,
                   data_root: str | None = None, ppl_file: str | None = None,
                   seq_len: int = 1024, max_windows: int | None = None,
                   limit: int | None = None, batch_size: int = 16,
                   progress: bool = True, mesh: Mesh | None = None,
                   num_fewshot: dict[str, int] | None = None, mmlu_only_ok: bool = False,
                   mmlu_per_subject: int | None = None) -> dict[str, dict]:
  """Perplexity (task `ppl`) and zero-shot tasks; returns {task: metrics}. With a `mesh`,
  params are sharded once by the logical-axis rules and every batch is split over it.

  Perplexity is of `ppl_file`, else of the WikiText-2 test text; that and the tasks' data
  come from `data_root`, the default local folders or the hub, in that order (`sources`).
  `num_fewshot` maps a task to its shots (absent: zero-shot).
  """
  from minitron_jax.evaluate import sources, tasks

  unknown = [t for t in task_names if t != "ppl" and t not in tasks.TASKS]
  if unknown:
    raise SettingError("tasks", f"{{name}}: unknown task(s) {unknown}; known: ppl, "
                       f"{', '.join(tasks.TASKS)}")
  results = {}
  params = _placed(params, cfg, mesh)
  for name in task_names:
    if name == "ppl":
      if ppl_file is None:
        text, where = sources.load_ppl_text(data_root)
      elif not os.path.isfile(ppl_file):
        raise SettingError("ppl_file", f"{{name}}={ppl_file}: no such file")
      else:
        with open(ppl_file, encoding="utf-8") as f:
          text, where = f.read(), ppl_file
      ids = text_tokens(tokenizer, text)
      t0 = time.perf_counter()
      res = perplexity(params, cfg, ids, seq_len=seq_len, max_windows=max_windows,
                       batch_size=max(1, batch_size // 4), progress=progress, mesh=mesh,
                       bos_id=bos_prefix(tokenizer))
      res["seconds"] = round(time.perf_counter() - t0, 2)
      res["file"] = where
      results["ppl"] = res
    else:
      results[name] = evaluate_task(params, cfg, tokenizer, name, data_root, limit=limit,
                                    batch_size=batch_size, max_len=seq_len, progress=progress,
                                    mesh=mesh, num_fewshot=(num_fewshot or {}).get(name, 0),
                                    mmlu_only_ok=mmlu_only_ok, per_group=mmlu_per_subject)
  return results
