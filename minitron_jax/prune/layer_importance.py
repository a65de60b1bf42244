"""Layer importance for depth pruning, as in the Llama-3.1-Minitron report.

- Block importance (ShortGPT): 1 - mean cosine similarity between the input of layer i and the
  output of layer i+k-1, per contiguous block of k layers.
- LM-loss increase when a contiguous block of k layers starting at i is removed (skipped via a
  layer mask, so every choice of block shares one compiled forward).
- Accuracy drop on a multiple-choice task when a contiguous block is removed.
"""

from __future__ import annotations

import functools
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from minitron_jax import model as M, plots, sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.prune.importance import padded_batch, jitted_lm_loss

METRICS = ("block_importance", "lm_loss", "accuracy")


def _cos(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)


@functools.lru_cache(maxsize=None)
def _bi_step(cfg: LlamaConfig, block_sizes: tuple[int, ...], mesh: Mesh | None = None):
  def step(params, tokens_bt, weights_b):
    out = M.forward(params, cfg, tokens_bt, return_hidden=True)
    h = jnp.concatenate([out["embeddings"][None], out["hidden"]], 0)  # (L+1, B, T, D)
    res = {}
    for k in block_sizes:
      starts = h.shape[0] - k  # blocks [i, i+k) for i in 0..L-k

      def mean_cos(i):
        cos_bt = _cos(h[i], h[i + k])
        if weights_b is None:
          return jnp.mean(cos_bt)
        return jnp.sum(cos_bt * weights_b[:, None]) / (jnp.sum(weights_b) * cos_bt.shape[1])

      res[k] = jax.vmap(mean_cos)(jnp.arange(starts))
    return res

  return sharding.jit_on(step, mesh)


def block_importance(params, cfg: LlamaConfig, batches: Iterable[np.ndarray],
                     block_sizes: Sequence[int] = (1,), mesh: Mesh | None = None
                     ) -> dict[int, np.ndarray]:
  """{k: (L-k+1,) array}: 1 - mean cos(input of layer i, output of layer i+k-1).

  With a `mesh`, params are sharded by the rules and batch rows split over the batch axes.
  """
  sizes = _check_sizes(cfg, block_sizes)
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
  step = _bi_step(cfg, sizes, mesh)
  outs, counts = [], []
  for tokens in batches:  # results stay on device until the single fetch below
    outs.append(step(params, *padded_batch(tokens, mesh)))
    counts.append(len(tokens))
  outs, n = jax.device_get(outs), sum(counts)
  return {k: 1.0 - sum(np.asarray(o[k], np.float64) * c for o, c in zip(outs, counts)) / n
          for k in sizes}


def _check_sizes(cfg: LlamaConfig, block_sizes: Sequence[int]) -> tuple[int, ...]:
  sizes = tuple(sorted(set(int(k) for k in block_sizes)))
  if not sizes or sizes[0] < 1 or sizes[-1] >= cfg.num_hidden_layers:
    raise ValueError(f"block sizes {list(block_sizes)} must be in [1, "
                     f"{cfg.num_hidden_layers - 1}]")
  return sizes


def block_mask(num_layers: int, start: int, k: int) -> np.ndarray:
  mask = np.ones(num_layers, bool)
  mask[start:start + k] = False
  return mask


def lm_loss_drop(params, cfg: LlamaConfig, batches: Sequence[np.ndarray],
                 block_sizes: Sequence[int] = (1,), progress=None, mesh: Mesh | None = None
                 ) -> tuple[float, dict[int, np.ndarray]]:
  """(baseline loss, {k: (L-k+1,) loss with layers [i, i+k) removed}); sharded on `mesh`
  as `block_importance`."""
  sizes = _check_sizes(cfg, block_sizes)
  loss_fn = jitted_lm_loss(cfg, masked=True, mesh=mesh)
  if mesh is not None:
    params = sharding.shard_params(params, cfg, mesh)
    batches = [padded_batch(b, mesh) for b in batches]
  else:
    batches = [(np.asarray(b, np.int32),) for b in batches]

  def mean_loss(mask):  # one host sync per mask, not per batch
    if mesh is not None:
      mask = sharding.put_global(mask, sharding.replicated(mesh))
      losses = [loss_fn(params, t, mask, w) for t, w in batches]
    else:
      losses = [loss_fn(params, t, mask) for (t,) in batches]
    return float(np.mean(np.asarray(jax.device_get(losses), np.float64)))

  base = mean_loss(np.ones(cfg.num_hidden_layers, bool))
  out, done = {}, 0
  total = sum(cfg.num_hidden_layers - k + 1 for k in sizes)
  for k in sizes:
    vals = []
    for i in range(cfg.num_hidden_layers - k + 1):
      vals.append(mean_loss(block_mask(cfg.num_hidden_layers, i, k)))
      done += 1
      if progress:
        progress(done, total)
    out[k] = np.array(vals)
  return base, out


def drop_layers_params(params, cfg: LlamaConfig, dropped: Sequence[int]):
  """Params and config without the given layers (a slice of the stacked `layers` axis)."""
  keep = np.array([i for i in range(cfg.num_hidden_layers) if i not in set(dropped)])
  layers = jax.tree_util.tree_map(lambda x: x[keep], params["layers"])
  return {**params, "layers": layers}, cfg.keep_layers(keep)


def accuracy_drop(params, cfg: LlamaConfig, tokenizer, task: str, data_root: str, *,
                  block_sizes: Sequence[int] = (1,), limit: int | None = 200,
                  batch_size: int = 16, progress=None, mesh: Mesh | None = None
                  ) -> tuple[float, dict[int, np.ndarray]]:
  """(baseline accuracy, {k: (L-k+1,) accuracy with layers [i, i+k) removed})."""
  from minitron_jax.evaluate import scoring as evaluate

  sizes = _check_sizes(cfg, block_sizes)
  base = evaluate.evaluate_task(params, cfg, tokenizer, task, data_root, limit=limit,
                                batch_size=batch_size, progress=False, mesh=mesh)["acc"]
  out, done = {}, 0
  total = sum(cfg.num_hidden_layers - k + 1 for k in sizes)
  for k in sizes:
    vals = []
    for i in range(cfg.num_hidden_layers - k + 1):
      p, c = drop_layers_params(params, cfg, range(i, i + k))
      vals.append(evaluate.evaluate_task(p, c, tokenizer, task, data_root, limit=limit,
                                         batch_size=batch_size, progress=False,
                                         mesh=mesh)["acc"])
      done += 1
      if progress:
        progress(done, total)
    out[k] = np.array(vals)
  return base, out


def plot(path: str, curves: dict[str, tuple[float | None, dict[int, np.ndarray]]],
         title: str = "") -> None:
  """One panel per metric: value against the first removed layer, one line per block size."""
  plt = plots.pyplot()
  fig, panels = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
  for ax, (name, (base, per_k)) in zip(panels[0], curves.items()):
    for k, vals in sorted(per_k.items()):
      ax.plot(np.arange(len(vals)), vals, marker="o", ms=3, label=f"{k} layer(s) removed")
    if base is not None:
      ax.axhline(base, color="gray", ls="--", lw=1, label="no layer removed")
    ax.set_xlabel("first removed layer")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
