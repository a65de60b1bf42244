"""Distillation losses: logit KL, hidden-state and embedding losses, next-token cross-entropy.

Every loss is a pure function over arrays, computes in float32 and checks its arguments. Token
losses come in two forms: per token (`*_bt`, shape (B, T)) and as a masked mean. The training
step sums per-token values over micro-batches and divides once by the count of the whole
global batch (`Normalizers`), so gradient accumulation gives exactly the gradient of one big
batch. The dynamic hidden-loss weight is a ratio of two global means, not a sum over
micro-batches: `distillation_terms` hands the step the terms apart so it can form that ratio
once over the global batch (see `step.make_train_step`).

Shape letters: B batch, T tokens, V vocab, K top-k, L layers, D student width, E teacher width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax import model as M
from minitron_jax.config import expand_ranges
from minitron_jax.settings import SettingError

KL_KINDS = ("forward", "reverse")
HIDDEN_LOSSES = ("none", "cosine", "nmse")
# A cached teacher's targets: its top-K logits and their vocabulary ids, each (B, T, K).
TOPK_KEYS = ("topk_values", "topk_indices")
_EPS = 1e-6


def _f32(x: jax.Array) -> jax.Array:
  """At least float32 (bf16 is widened; float64 is kept, for gradient checks)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """What the student is trained to match.

  Attributes:
    temperature: softmax temperature tau of the logit KL; the KL is scaled by tau**2 so its
      gradient keeps the same size across temperatures.
    kl: "forward" = KL(teacher || student) (mass-covering), "reverse" = KL(student || teacher).
    top_k: keep only the teacher's top-k logits, renormalised over those k (forward KL only).
    logit_weight: weight of the logit KL.
    hidden_loss: "none", "cosine" (1 - cosine similarity) or "nmse" (squared error over the
      teacher's squared norm) between hidden states of mapped layers.
    hidden_weight: weight alpha of the hidden loss; None = dynamic, alpha = L_logits / L_hidden
      under stop_gradient (both terms then have the same size, as in the Minitron recipe).
    embedding_weight: weight of the same distance between the embedding outputs.
    ce_weight: weight of next-token cross-entropy on the data (0 = pure distillation).
    layer_map: student layer i is matched with teacher layer layer_map[i]; None = identity
      (equal depths only). For a depth-pruned student, the pruning report's `kept_layers`.
  """

  temperature: float = 1.0
  kl: str = "forward"
  top_k: int | None = None
  logit_weight: float = 1.0
  hidden_loss: str = "none"
  hidden_weight: float | None = None
  embedding_weight: float = 0.0
  ce_weight: float = 0.0
  layer_map: tuple[int, ...] | None = None

  def __post_init__(self):
    if not self.temperature > 0:
      raise SettingError("temperature", f"{{name}} must be > 0, got {self.temperature}")
    if self.kl not in KL_KINDS:
      raise SettingError("kl", f"{{name}} must be one of {KL_KINDS}, got {self.kl!r}")
    if self.top_k is not None and (self.top_k < 1 or self.kl != "forward"):
      raise SettingError("top_k", f"{{name}}={self.top_k} needs top_k >= 1 and the forward KL")
    if self.hidden_loss not in HIDDEN_LOSSES:
      raise SettingError("hidden_loss", f"{{name}} must be one of {HIDDEN_LOSSES}, got "
                         f"{self.hidden_loss!r}")
    for name in ("logit_weight", "embedding_weight", "ce_weight"):
      if not getattr(self, name) >= 0:
        raise SettingError(name, f"{{name}} must be >= 0, got {getattr(self, name)}")
    if self.hidden_weight is not None and not self.hidden_weight >= 0:
      raise SettingError("hidden_weight", "{name} must be >= 0 or None (dynamic), got "
                         f"{self.hidden_weight}")
    if self.layer_map is not None:
      object.__setattr__(self, "layer_map", tuple(int(i) for i in self.layer_map))

  @property
  def needs_hidden(self) -> bool:
    return self.hidden_loss != "none"

  @property
  def needs_projection_loss(self) -> bool:
    """Whether any loss compares student and teacher activations (and may need a projection)."""
    return self.needs_hidden or (self.embedding_weight > 0)


def resolve_layer_map(layer_map: Sequence[int] | None, student_layers: int,
                      teacher_layers: int) -> tuple[int, ...]:
  """Checks a student -> teacher layer map; None means identity and needs equal depths."""
  if layer_map is None:
    if student_layers != teacher_layers:
      raise ValueError(f"the student has {student_layers} layers and the teacher "
                       f"{teacher_layers}: give a layer map (e.g. the pruning report's "
                       "kept_layers) or disable the hidden-state loss")
    return tuple(range(student_layers))
  layer_map = tuple(int(i) for i in layer_map)
  if len(layer_map) != student_layers:
    raise ValueError(f"the layer map has {len(layer_map)} entries, the student has "
                     f"{student_layers} layers")
  bad = [i for i in layer_map if not 0 <= i < teacher_layers]
  if bad:
    raise ValueError(f"layer map entries {bad} are not teacher layers [0, {teacher_layers})")
  return layer_map


def parse_layer_map(spec: str) -> tuple[int, ...]:
  """`"0,1,4-7"` -> (0, 1, 4, 5, 6, 7), order kept."""
  return tuple(expand_ranges(spec, "layer map"))


def read_prune_report(path: str | os.PathLike) -> dict:
  """A pruning report (JSON object)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such pruning report")
  try:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(report, dict):
    raise ValueError(f"{path}: a pruning report must be a JSON object")
  return report


def _find(node: Any, key: str) -> tuple[bool, Any]:
  """(found, value) of the first `key` in a nested JSON object, depth first."""
  if isinstance(node, Mapping):
    if key in node:
      return True, node[key]
    for v in node.values():
      found, value = _find(v, key)
      if found:
        return True, value
  return False, None


def _index_list(value: Any, what: str, path: str) -> tuple[int, ...] | None:
  if value is None:
    return None
  if (not isinstance(value, list) or not value
      or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
    raise ValueError(f"{path}: {what} must be a non-empty list of integers or null")
  return tuple(value)


def layer_map_from_report(path: str | os.PathLike) -> tuple[int, ...] | None:
  """The teacher layers a pruned student kept, in order: its layer map.

  Reads `kept_layers` (anywhere in the report) or `kept.layers` (`prune.plan_summary`).
  Returns None when the report kept every layer (width pruning): the identity map.
  """
  path = os.fspath(path)
  report = read_prune_report(path)
  found, value = _find(report, "kept_layers")
  if not found:
    found, kept = _find(report, "kept")
    if not found or not isinstance(kept, Mapping) or "layers" not in kept:
      raise ValueError(f"{path}: no 'kept_layers' or 'kept.layers' entry")
    value = kept["layers"]
  return _index_list(value, "the kept layers", path)


def kept_embed_from_report(path: str | os.PathLike) -> tuple[int, ...] | None:
  """The teacher embedding channels a width-pruned student kept (`kept.embed`), or None."""
  path = os.fspath(path)
  _, kept = _find(read_prune_report(path), "kept")
  if not isinstance(kept, Mapping):
    return None
  return _index_list(kept.get("embed"), "kept.embed", path)


def selection_projection(kept_embed: Sequence[int], teacher_width: int) -> np.ndarray:
  """(D, E) float32 that puts student channel i back at teacher channel kept_embed[i].

  For a width-pruned student this is where the projection starts: its residual stream is the
  teacher's restricted to the kept channels, so the projected states already point the
  teacher's way.
  """
  kept = np.asarray(kept_embed, np.int64)
  if kept.ndim != 1 or np.any(kept < 0) or np.any(kept >= teacher_width):
    raise ValueError(f"kept embedding channels must lie in [0, {teacher_width})")
  if len(np.unique(kept)) != len(kept):
    raise ValueError("kept embedding channels repeat")
  proj = np.zeros((len(kept), teacher_width), np.float32)
  proj[np.arange(len(kept)), kept] = 1.0
  return proj


# ---------------------------------------------------------------------------- masks and labels


def token_mask(segment_ids_bt: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """Positions that hold real tokens (segment 0 is padding); all of them without segments."""
  if segment_ids_bt is None:
    return jnp.ones(shape, bool)
  return segment_ids_bt != 0


def next_token_labels(tokens_bt: jax.Array, segment_ids_bt: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Targets of next-token prediction and where they are valid.

  The target of position t is token t+1 only if both lie in the same (non-padding) segment,
  so a packed row never teaches one document to predict the start of the next.

  Returns:
    (labels_bt int32, valid_bt bool); the last position is never valid.
  """
  b, t = tokens_bt.shape
  labels_bt = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros((b, 1), tokens_bt.dtype)], axis=1)
  has_next = jnp.arange(t) < t - 1
  if segment_ids_bt is None:
    return labels_bt.astype(jnp.int32), jnp.broadcast_to(has_next, (b, t))
  nxt = jnp.concatenate([segment_ids_bt[:, 1:], jnp.zeros((b, 1), segment_ids_bt.dtype)],
                        axis=1)
  valid_bt = (segment_ids_bt != 0) & (nxt == segment_ids_bt) & has_next
  return labels_bt.astype(jnp.int32), valid_bt


def masked_mean(x_bt: jax.Array, mask_bt: jax.Array, count: jax.Array | None = None
                ) -> jax.Array:
  """sum(x * mask) / count, with count = sum(mask) by default (at least 1)."""
  total = jnp.sum(jnp.where(mask_bt, _f32(x_bt), 0.0))
  if count is None:
    count = jnp.sum(mask_bt)
  return total / jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


# ---------------------------------------------------------------------------- logit losses


def _check_logits(student_btv, teacher_btv, temperature):
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if student_btv.shape != teacher_btv.shape:
    raise ValueError(f"student logits {student_btv.shape} and teacher logits "
                     f"{teacher_btv.shape} differ in shape (same vocabulary needed)")


def forward_kl_bt(student_btv: jax.Array, teacher_btv: jax.Array, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
  """tau^2 * KL(p_teacher || p_student) per token, softmaxes at temperature tau.

  With `top_k`, the teacher distribution is its top-k logits renormalised over those k, and
  the student keeps its full-vocabulary log-probabilities at the same ids: the loss is then
  also zero only if the student puts all its mass on the teacher's top k, so it is still
  pushed away from the tail (for identical logits it equals -tau^2 log(student mass on top k)).
  """
  _check_logits(student_btv, teacher_btv, temperature)
  s = _f32(student_btv) / temperature
  t = _f32(teacher_btv) / temperature
  logq_btv = jax.nn.log_softmax(s, axis=-1)
  if top_k is not None:
    if not 1 <= top_k <= t.shape[-1]:
      raise ValueError(f"top_k must be in [1, {t.shape[-1]}], got {top_k}")
    t_btk, idx_btk = jax.lax.top_k(t, top_k)
    logp = jax.nn.log_softmax(t_btk, axis=-1)
    logq = jnp.take_along_axis(logq_btv, idx_btk, axis=-1)
  else:
    logp, logq = jax.nn.log_softmax(t, axis=-1), logq_btv
  return temperature ** 2 * jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def reverse_kl_bt(student_btv: jax.Array, teacher_btv: jax.Array, temperature: float = 1.0
                  ) -> jax.Array:
  """tau^2 * KL(p_student || p_teacher) per token (mode-seeking)."""
  _check_logits(student_btv, teacher_btv, temperature)
  logq = jax.nn.log_softmax(_f32(student_btv) / temperature, axis=-1)
  logp = jax.nn.log_softmax(_f32(teacher_btv) / temperature, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)


def topk_kl_bt(student_btv: jax.Array, values_btk: jax.Array, indices_btk: jax.Array,
               temperature: float = 1.0) -> jax.Array:
  """`forward_kl_bt` with `top_k=K` from the teacher's top-K logits alone (a teacher cache):
  tau^2 * KL(teacher top-K renormalised || student) per token, in float32."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  logq_btv = jax.nn.log_softmax(_f32(student_btv) / temperature, axis=-1)
  logp_btk = jax.nn.log_softmax(_f32(values_btk) / temperature, axis=-1)
  logq_btk = jnp.take_along_axis(logq_btv, indices_btk, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(logp_btk) * (logp_btk - logq_btk), axis=-1)


def check_topk_targets(cfg: DistillConfig) -> None:
  """Top-K targets hold logits only: refuse the losses that need more of the teacher."""
  bad = [(name, value) for name, value, ok in (
      ("kl", cfg.kl, cfg.kl == "forward"), ("hidden_loss", cfg.hidden_loss, not cfg.needs_hidden),
      ("embedding_weight", cfg.embedding_weight, not cfg.embedding_weight > 0)) if not ok]
  if bad:
    name, value = bad[0]
    raise SettingError(name, f"{{name}}={value!r}: a teacher cache supports the forward KL on "
                       "logits only (no hidden-state or embedding loss)")


def kl_bt(student_btv, teacher_btv, cfg: DistillConfig) -> jax.Array:
  if cfg.kl == "reverse":
    return reverse_kl_bt(student_btv, teacher_btv, cfg.temperature)
  return forward_kl_bt(student_btv, teacher_btv, cfg.temperature, cfg.top_k)


# ---------------------------------------------------------------------------- activation losses


def normalize(x: jax.Array) -> jax.Array:
  """RMS normalisation without a learned scale, in float32.

  Hidden states are compared after this norm: the residual stream grows with depth, and a
  learned scale would let the student lower the loss by shrinking norm weights.
  """
  x = _f32(x)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + _EPS)


def hidden_distance(student: jax.Array, teacher: jax.Array, kind: str) -> jax.Array:
  """Distance over the last axis: 1 - cosine similarity, or |s - t|^2 / |t|^2."""
  if student.shape != teacher.shape:
    raise ValueError(f"student {student.shape} and teacher {teacher.shape} activations differ "
                     "in shape (a projection is needed when widths differ)")
  s, t = _f32(student), _f32(teacher)
  if kind == "cosine":
    dot = jnp.sum(s * t, axis=-1)
    norms = jnp.sqrt(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1))
    return 1.0 - dot / jnp.maximum(norms, _EPS)
  if kind == "nmse":
    return jnp.sum((s - t) ** 2, axis=-1) / jnp.maximum(jnp.sum(t * t, axis=-1), _EPS)
  raise ValueError(f"hidden loss kind must be 'cosine' or 'nmse', got {kind!r}")


def project(x_btd: jax.Array, proj_de: jax.Array | None) -> jax.Array:
  """The shared learned map from student width D to teacher width E (None: same width)."""
  if proj_de is None:
    return x_btd
  return jnp.einsum("...D,DE->...E", x_btd, _f32(proj_de))


def init_projection(key: jax.Array, student_width: int, teacher_width: int) -> jax.Array:
  """(D, E) float32 with variance 1/D, so projected normalised states have unit scale."""
  return jax.random.normal(key, (student_width, teacher_width), jnp.float32) * (
      student_width ** -0.5)


def hidden_loss_bt(student_lbtd: jax.Array, teacher_lbte: jax.Array, layer_map: Sequence[int],
                   proj_de: jax.Array | None, kind: str) -> jax.Array:
  """Per-token hidden-state distance, averaged over the mapped layers.

  Args:
    student_lbtd: the student's layer outputs (L_s, B, T, D).
    teacher_lbte: the teacher's layer outputs (L_t, B, T, E).
    layer_map: student layer i <-> teacher layer layer_map[i] (length L_s).
    proj_de: (D, E) projection, or None when D == E.
    kind: "cosine" or "nmse".
  """
  if len(layer_map) != student_lbtd.shape[0]:
    raise ValueError(f"layer map of length {len(layer_map)} for {student_lbtd.shape[0]} "
                     "student layers")
  teacher = normalize(teacher_lbte[jnp.asarray(layer_map)])
  student = project(normalize(student_lbtd), proj_de)
  return jnp.mean(hidden_distance(student, teacher, kind), axis=0)


# ---------------------------------------------------------------------------- the combined loss


class Normalizers(NamedTuple):
  """Denominators of the token means, counted over the whole global batch."""
  tokens: jax.Array  # real (non-padding) positions: the KL and activation losses
  labels: jax.Array  # positions with a same-document next token: cross-entropy


def normalizers(tokens_bt: jax.Array, segment_ids_bt: jax.Array | None) -> Normalizers:
  _, valid_bt = next_token_labels(tokens_bt, segment_ids_bt)
  mask_bt = token_mask(segment_ids_bt, tokens_bt.shape)
  return Normalizers(jnp.sum(mask_bt).astype(jnp.float32), jnp.sum(valid_bt).astype(jnp.float32))


class Head(NamedTuple):
  """What projects final-normed states to logits: a model's params (its `embed` or `lm_head`
  is used) and config, and how many tokens of logits exist at once (<= 0: all of them)."""
  params: Any
  cfg: Any
  chunk: int = 0


def _require_head(*heads):
  if any(h is None for h in heads):
    raise ValueError("model outputs without logits need a Head (params, config, chunk) to "
                     "project their normed states")


def lm_loss(out: Mapping[str, Any] | jax.Array, tokens_bt: jax.Array,
            segment_ids_bt: jax.Array | None = None, norm: Normalizers | None = None,
            prefix: str = "train", head: Head | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy (teacher correction, or plain fine-tuning).

  Args:
    out: logits (B, T, V), or a `model.forward` output: with `logits`, or with `normed`
      states that `head` projects a chunk of tokens at a time.
  """
  norm = norm or normalizers(tokens_bt, segment_ids_bt)
  labels_bt, valid_bt = next_token_labels(tokens_bt, segment_ids_bt)
  if not isinstance(out, Mapping):
    out = {"logits": out}
  if "logits" in out:
    nll_bt = M.token_nll_bt(out["logits"], labels_bt)
  else:
    _require_head(head)
    nll_bt = M.token_scores_bt(head.params, head.cfg, out["normed"], labels_bt, head.chunk)[0]
  ce = masked_mean(nll_bt, valid_bt, norm.labels)
  return ce, {f"{prefix}/ce": ce, f"{prefix}/loss": ce}


def logit_terms_bt(student: Mapping[str, Any], teacher: Mapping[str, Any],
                   labels_bt: jax.Array, cfg: DistillConfig,
                   heads: tuple[Head, Head | None] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-token logit KL and student next-token NLL, both (B, T).

  The teacher is a model output (`logits`, or `normed` states and a Head) or cached top-K
  targets (`TOPK_KEYS`). From the outputs' `logits` when they have them; otherwise the
  student's `normed` states (and a live teacher's) go through their `Head`s, `heads[0].chunk`
  tokens at a time under `jax.checkpoint`, so no (B, T, V) logits exist whole, forward or
  backward.
  """
  cached = TOPK_KEYS[0] in teacher

  def per_token(s_btv, t_btx, labels):
    kl = (topk_kl_bt(s_btv, *t_btx, cfg.temperature) if cached
          else kl_bt(s_btv, t_btx[0], cfg))
    return kl, M.token_nll_bt(s_btv, labels)

  if "logits" in student and (cached or "logits" in teacher):
    t_btx = tuple(teacher[k] for k in TOPK_KEYS) if cached else (teacher["logits"],)
    return per_token(student["logits"], t_btx, labels_bt)
  if heads is None:
    _require_head(None)
  s_head, t_head = heads

  def chunk_terms(s_bcd, *rest):
    *t_bcx, labels_bc = rest
    if not cached:
      t_bcx = (M.unembed(t_head.params, t_head.cfg, t_bcx[0], normed=True),)
    return per_token(M.unembed(s_head.params, s_head.cfg, s_bcd, normed=True), t_bcx,
                     labels_bc)

  t_bt = tuple(teacher[k] for k in TOPK_KEYS) if cached else (teacher["normed"],)
  return M.chunked_token_map(chunk_terms, s_head.chunk, student["normed"], *t_bt, labels_bt)


class LossTerms(NamedTuple):
  """The distillation objective in the pieces the weight alpha of the hidden loss needs.

  loss = rest + alpha * hidden, with dynamic alpha = logits / hidden (under stop_gradient).
  """
  rest: jax.Array    # every weighted term but the hidden one (KL, embedding, CE)
  logits: jax.Array  # logit_weight * KL: the numerator of the dynamic alpha
  hidden: jax.Array  # the unweighted hidden-state loss (0 when it is off)


def dynamic_alpha(logits: jax.Array, hidden: jax.Array) -> jax.Array:
  """alpha = L_logits / L_hidden under stop_gradient: both terms then have the same size."""
  return jax.lax.stop_gradient(logits / jnp.maximum(hidden, _EPS))


def distillation_terms(student: Mapping[str, Any], teacher: Mapping[str, Any],
                       tokens_bt: jax.Array, segment_ids_bt: jax.Array | None,
                       proj_de: jax.Array | None, cfg: DistillConfig,
                       norm: Normalizers | None = None, heads: tuple[Head, Head] | None = None
                       ) -> tuple[LossTerms, dict[str, jax.Array]]:
  """The objective's terms, before the hidden loss is weighted (`distillation_loss` args).

  Returns:
    (terms, metrics): the unweighted `distill/kl`, `distill/hidden`, `distill/embedding` and
    `distill/ce`; no `distill/alpha` or `distill/loss` (they need the weight).
  """
  norm = norm or normalizers(tokens_bt, segment_ids_bt)
  mask_bt = token_mask(segment_ids_bt, tokens_bt.shape)
  labels_bt, valid_bt = next_token_labels(tokens_bt, segment_ids_bt)
  kl_tok_bt, nll_bt = logit_terms_bt(student, teacher, labels_bt, cfg, heads)
  kl = masked_mean(kl_tok_bt, mask_bt, norm.tokens)
  logits_term = cfg.logit_weight * kl
  rest = logits_term
  hid = jnp.zeros((), jnp.float32)
  metrics = {"distill/kl": kl}
  if cfg.needs_hidden:
    if cfg.layer_map is None:
      raise ValueError("resolve cfg.layer_map (resolve_layer_map) before computing the loss")
    hid = masked_mean(hidden_loss_bt(student["hidden"], teacher["hidden"], cfg.layer_map,
                                     proj_de, cfg.hidden_loss), mask_bt, norm.tokens)
    metrics["distill/hidden"] = hid
  if cfg.embedding_weight > 0:
    kind = cfg.hidden_loss if cfg.needs_hidden else "cosine"
    emb_bt = hidden_distance(project(normalize(student["embeddings"]), proj_de),
                             normalize(teacher["embeddings"]), kind)
    emb = masked_mean(emb_bt, mask_bt, norm.tokens)
    rest = rest + cfg.embedding_weight * emb
    metrics["distill/embedding"] = emb
  ce = masked_mean(nll_bt, valid_bt, norm.labels)
  metrics["distill/ce"] = ce  # reported even at weight 0: the student's own LM loss
  if cfg.ce_weight > 0:
    rest = rest + cfg.ce_weight * ce
  return LossTerms(rest, logits_term, hid), metrics


def combine_terms(terms: LossTerms, metrics: dict[str, jax.Array], cfg: DistillConfig
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """rest + alpha * hidden, adding `distill/alpha` (hidden loss on) and `distill/loss`."""
  loss = terms.rest
  metrics = dict(metrics)
  if cfg.needs_hidden:
    if cfg.hidden_weight is None:
      alpha = dynamic_alpha(terms.logits, terms.hidden)
    else:
      alpha = jnp.asarray(cfg.hidden_weight, jnp.float32)
    loss = loss + alpha * terms.hidden
    metrics["distill/alpha"] = alpha
  metrics["distill/loss"] = loss
  return loss, metrics


def distillation_loss(student: Mapping[str, Any], teacher: Mapping[str, Any],
                      tokens_bt: jax.Array, segment_ids_bt: jax.Array | None,
                      proj_de: jax.Array | None, cfg: DistillConfig,
                      norm: Normalizers | None = None, heads: tuple[Head, Head] | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The full objective: logit_weight * KL + alpha * hidden + beta * embedding + gamma * CE.

  Args:
    student, teacher: `model.forward` outputs (`logits` or `normed`, `embeddings`, and
      `hidden` when the hidden loss is on). The teacher's must already be under stop_gradient.
    tokens_bt, segment_ids_bt: the batch (segment 0 = padding; None = unpacked rows).
    proj_de: the shared projection when widths differ, else None.
    cfg: loss settings; `cfg.layer_map` must already be resolved when the hidden loss is on.
    norm: token counts to divide by (default: this batch's own).
    heads: (student, teacher) `Head`s, for outputs with `normed` states instead of logits.

  Returns:
    (loss, metrics) with `distill/*` metrics; each term is reported unweighted. A dynamic
    alpha is this batch's own ratio: over micro-batches use `distillation_terms` instead.
  """
  terms, metrics = distillation_terms(student, teacher, tokens_bt, segment_ids_bt, proj_de,
                                      cfg, norm, heads)
  return combine_terms(terms, metrics, cfg)
