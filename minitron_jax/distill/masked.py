"""Training a sparse model with its zeros held fixed (masked distillation).

`keep_zeros` wraps an optimizer: the linear weights' entries that are exactly zero in the
params the update is computed for stay exactly zero.

  1. Their gradients are zeroed before the wrapped optimizer sees them, so clipping measures
     the norm of the trainable entries only and Adam's moments of masked entries stay exactly
     zero (they start at zero and only ever receive zero gradients).
  2. The wrapped optimizer's updates are multiplied by the same mask (a projection), so no
     other term (weight decay, a schedule, a transform added later) can move a masked entry.

The mask is read from the params at every update (`params != 0`), so it needs no state: a
checkpoint of a masked run restores and resumes as any other. Since masked entries stay zero,
the mask never changes; an unmasked weight would have to land on exactly 0.0 to join it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# The matrices sparsity applies to: the decoder layers' linear weights.
MASKED_LEAVES = ("q", "k", "v", "o", "gate", "up", "down")


def _is_masked(path) -> bool:
  keys = [str(getattr(p, "key", p)) for p in path]
  return "layers" in keys and keys[-1] in MASKED_LEAVES


def zero_masks(params):
  """Tree of `params`' structure: float 0/1 keep masks for the masked leaves, None elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (x != 0).astype(x.dtype) if _is_masked(p) else None, params)


def _apply(tree, masks):
  return jax.tree_util.tree_map(lambda t, m: t if m is None else t * m.astype(t.dtype), tree,
                                masks, is_leaf=lambda x: x is None)


def keep_zeros(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with the zeros of the masked params frozen (gradients masked, updates projected).

  The update needs `params`, as `optax.adamw` does.
  """

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("keep_zeros needs the params in update()")
    masks = zero_masks(params)
    updates, state = inner.update(_apply(grads, masks), state, params)
    return _apply(updates, masks), state

  return optax.GradientTransformation(inner.init, update)

