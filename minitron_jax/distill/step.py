"""The train step: optimizer, schedule, sharded train state, gradient accumulation, AOT compile.

One jitted function `(state, teacher_params, batch) -> (state, metrics)` does a whole
optimizer update. Gradient accumulation runs inside it as a `lax.scan` over micro-batches
rather than with `optax.MultiSteps`: the update, clipping and schedule then see each global
batch exactly once, a step is one update (so `steps`, checkpoints and metrics all count
updates), the optimizer state holds no accumulator to checkpoint, and the host dispatches one
computation per update instead of one per micro-batch.

Parameters stay float32 (master weights); the model computes in `TrainConfig.dtype`
(bfloat16 by default) by casting weights inside the forward pass.

The state is a dict: `step` (int32), `params` (`{"model": ..., "proj": ...}`; `proj` only when
a hidden or embedding loss compares different widths) and `opt_state`.

The teacher's targets come from a pluggable source: `LiveTeacher` runs the teacher inside the
step under stop_gradient; `CachedTopK` reads its top-K logits from the batch (a teacher cache).
Both go through the same loss code, `logits_chunk` tokens of logits at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minitron_jax import model as M, sharding
from minitron_jax.sharding import put_global, replicated  # noqa: F401 (re-exported)
from minitron_jax.distill import losses as distill
from minitron_jax.distill import lora as lora_lib
from minitron_jax.distill import masked
from minitron_jax.config import ATTENTION_IMPLS, LlamaConfig
from minitron_jax.settings import SettingError, check_positive

MODES = ("distill", "teacher_correction")
BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and run settings (model-independent).

  Attributes:
    mode: "distill" (student from teacher) or "teacher_correction" (the teacher alone, CE).
    steps: optimizer updates.
    global_batch_size: rows per update, over all hosts and devices.
    micro_batch_size: rows per forward pass (global); global_batch_size / micro_batch_size
      micro-batches are accumulated. None = no accumulation.
    seq_len: tokens per row.
    lr, min_lr, warmup_steps: linear warmup to `lr`, then cosine decay to `min_lr`.
    weight_decay: AdamW decay of matrices (never norms). 0 by default: a short run from a
      pretrained model should not pull weights towards zero.
    b1, b2, eps: Adam moments.
    grad_clip: clip the global gradient norm to this (0 = off).
    dtype: compute dtype; parameters and optimizer state stay float32.
    remat: recompute each layer's activations in the backward pass (less memory, ~1/3 more
      compute).
    logits_chunk: tokens per row whose logits exist at once in the losses and evaluation
      (student and teacher, forward and backward; `model.chunked_token_map`); 0 = the whole
      sequence. Exact either way; smaller saves memory (B x chunk x V floats instead of
      B x T x V) at the cost of a recomputed vocabulary projection in the backward pass.
    attention_impl: attention kernel of student and teacher (`config.ATTENTION_IMPLS`; "auto"
      picks by platform: splash on TPU, Pallas/cuDNN flash on GPU, XLA on CPU).
    seed: data order and the projection's initialisation.
    mesh: device mesh, e.g. "data:2,fsdp:2,tensor:2" (-1 = the remaining devices).
    save_every: checkpoint every N updates (0 = only at the end and on SIGTERM).
    keep_checkpoints: how many checkpoints to keep.
    eval_every: held-out evaluation every N updates, plus before the first and after the last
      (0 = never).
    eval_windows: held-out windows of `seq_len` tokens per evaluation.
    log_every: console line every N updates; metrics leave the device only every N updates
      (and before evaluations, checkpoints and the end), so the host never waits on a step.
    allow_schedule_change: on resume, accept new `steps`, `lr`, `min_lr` or `warmup_steps`
      (the learning-rate schedule) instead of refusing them.
    async_checkpointing: write checkpoints in a background thread.
    keep_sparsity: the decoder layers' linear weights that are zero at the start stay zero
      (masked distillation of a sparse model; `masked.keep_zeros`).
    data_workers: data-loader worker processes per JAX process (0 = read in the training
      process); the batches are the same at any count (`pipeline.Loader`).
  """

  mode: str = "distill"
  steps: int = 100
  global_batch_size: int = 8
  micro_batch_size: int | None = None
  seq_len: int = 512
  lr: float = 1e-4
  min_lr: float = 1e-5
  warmup_steps: int = 40
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  dtype: str = "bfloat16"
  remat: bool = False
  logits_chunk: int = M.LOGITS_CHUNK
  attention_impl: str = "auto"
  seed: int = 0
  mesh: str = "data:-1"
  save_every: int = 100
  keep_checkpoints: int = 3
  eval_every: int = 0
  eval_windows: int = 8
  log_every: int = 1
  allow_schedule_change: bool = False
  async_checkpointing: bool = True
  keep_sparsity: bool = False
  data_workers: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise SettingError("mode", f"{{name}} must be one of {MODES}, got {self.mode!r}")
    check_positive(self, "steps", "global_batch_size", "seq_len", "eval_windows", "log_every",
                   "keep_checkpoints")
    for name in ("warmup_steps", "save_every", "eval_every", "logits_chunk", "data_workers"):
      if getattr(self, name) < 0:
        raise SettingError(name, f"{{name}} must be >= 0, got {getattr(self, name)}")
    if self.seq_len < 2:
      raise SettingError("seq_len", f"{{name}} must be >= 2, got {self.seq_len}")
    micro = self.micro_batch_size
    if micro is not None and (micro < 1 or self.global_batch_size % micro):
      raise SettingError("micro_batch_size", f"{{name}}={micro} must divide "
                         f"global_batch_size={self.global_batch_size}")
    if not self.lr > 0:
      raise SettingError("lr", f"{{name}} must be > 0, got {self.lr}")
    if not 0 <= self.min_lr <= self.lr:
      raise SettingError("min_lr", f"{{name}} must lie in [0, lr={self.lr}], got {self.min_lr}")
    for name in ("weight_decay", "grad_clip"):
      if not getattr(self, name) >= 0:
        raise SettingError(name, f"{{name}} must be >= 0, got {getattr(self, name)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise SettingError("attention_impl", f"{{name}} must be one of {ATTENTION_IMPLS}, "
                         f"got {self.attention_impl!r}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise SettingError("dtype", "{name} must be float32, bfloat16 or float16, got "
                         f"{self.dtype!r}")

  @property
  def accum_steps(self) -> int:
    return self.global_batch_size // (self.micro_batch_size or self.global_batch_size)

  @property
  def micro(self) -> int:
    return self.micro_batch_size or self.global_batch_size


# ---------------------------------------------------------------------------- optimizer


def learning_rate(step, cfg: TrainConfig):
  """Learning rate of update `step` (0-based): linear warmup from lr/warmup to lr over
  `warmup_steps` updates, then cosine decay reaching `min_lr` at the last update."""
  step = jnp.asarray(step, jnp.float32)
  warm = float(max(cfg.warmup_steps, 1))
  warmup_lr = cfg.lr * (step + 1.0) / warm
  decay_len = float(max(cfg.steps - cfg.warmup_steps - 1, 1))
  progress = jnp.clip((step - cfg.warmup_steps) / decay_len, 0.0, 1.0)
  cosine_lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(step < cfg.warmup_steps, warmup_lr, cosine_lr)


def _decay_mask(params):
  """Decay matrices only: norms, biases (and anything 1-D per layer) are left alone."""
  def keep(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return not name.endswith(("norm", "bias")) and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on the schedule of `learning_rate` (zeros held fixed
  with `keep_sparsity`)."""
  adamw = optax.adamw(lambda s: learning_rate(s, cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 \
      else adamw
  return masked.keep_zeros(tx) if cfg.keep_sparsity else tx


# ---------------------------------------------------------------------------- state and sharding


def init_state(model_params, optimizer, proj=None, base=None) -> dict:
  """A fresh train state; params are cast to float32 master weights. With LoRA,
  `model_params` are the adapters and `base` the frozen model (kept as given, never trained)."""
  params = {"model": jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), model_params)}
  if proj is not None:
    params["proj"] = jnp.asarray(proj, jnp.float32)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optimizer.init(params)}
  return state if base is None else {**state, "base": base}


def eval_params(state: dict):
  """What the evaluation reads of a train state (or of its shardings): the model, or with
  LoRA the frozen base and the adapters (`make_eval_fn(..., lora=)` merges them)."""
  if "base" not in state:
    return state["params"]["model"]
  return {"base": state["base"], "adapters": state["params"]["model"]}


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  """Batches are (micro-batches, rows, tokens), rows split over data and fsdp."""
  row = sharding.logical_to_spec(("batch",), mesh=mesh)[0]
  s = NamedSharding(mesh, P(None, row, None))
  return {k: s for k in BATCH_KEYS}


def state_shardings(state_shape: dict, model_cfg: LlamaConfig, mesh: Mesh,
                    optimizer: optax.GradientTransformation) -> dict:
  """Params by the logical-axis rules; optimizer moments mirror their params; the rest (the
  step, counters, the small projection) is replicated."""
  rep = replicated(mesh)
  model = state_shape["params"]["model"]
  params_sh = {"model": lora_lib.adapter_shardings(model, mesh) if "base" in state_shape
               else sharding.param_shardings(model_cfg, mesh, params=model)}
  if "proj" in state_shape["params"]:
    params_sh["proj"] = rep
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, state_shape["opt_state"], params_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  state_sh = {"step": rep, "params": params_sh, "opt_state": opt_sh}
  if "base" in state_shape:
    state_sh["base"] = lora_lib.base_shardings(state_shape["base"], model_cfg, mesh)
  return state_sh


def abstract(tree, shardings):
  """ShapeDtypeStructs carrying shardings (for `lower` and checkpoint restore)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_rows(mesh: Mesh, cfg: TrainConfig) -> tuple[int, int]:
  """(index, count) of this process's slice of every global batch.

  Derived from the batch sharding rather than `jax.process_index()`, so processes whose
  devices hold the same rows (e.g. a tensor axis spanning hosts) read the same data.
  """
  micro = cfg.micro
  shape = (cfg.accum_steps, micro, cfg.seq_len)
  s = batch_shardings(mesh)["tokens"]
  shards = int(np.prod([mesh.shape[a] for a in _names(s.spec[1])]))
  if micro % shards:
    raise ValueError(f"micro_batch_size={micro} is not divisible by the {shards} batch shards "
                     f"of mesh {dict(mesh.shape)}")
  mine = {idx[1].indices(micro)[:2] for d, idx in s.devices_indices_map(shape).items()
          if d.process_index == jax.process_index()}
  lo, hi = min(a for a, _ in mine), max(b for _, b in mine)
  if sum(b - a for a, b in mine) != hi - lo:
    raise ValueError(f"mesh {dict(mesh.shape)}: this process's batch rows are not contiguous")
  return lo // (hi - lo), micro // (hi - lo)


def _names(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, cfg: TrainConfig
                 ) -> dict[str, jax.Array]:
  """This host's rows (R, T) -> global (A, micro, T) arrays.

  Micro-batch a holds global rows a, a + A, a + 2A, ...: with hosts owning contiguous blocks
  of the global batch, every micro-batch then has the same rows whatever the process count.
  """
  a = cfg.accum_steps
  shardings = batch_shardings(mesh)
  out = {}
  for k in BATCH_KEYS:
    x = np.asarray(local[k], np.int32)
    rows, t = x.shape
    x = x.reshape(rows // a, a, t).transpose(1, 0, 2)
    out[k] = jax.make_array_from_process_local_data(shardings[k], x,
                                                    (a, cfg.micro, t))
  return out


# ---------------------------------------------------------------------------- teacher targets


@dataclasses.dataclass(frozen=True)
class LiveTeacher:
  """The teacher runs inside the step on every micro-batch, under stop_gradient.

  Attributes:
    cfg: the teacher's config (its dtype and attention kernel are the run's).
  """

  cfg: LlamaConfig

  def targets(self, teacher_params, mb: dict, cfg: TrainConfig, hidden: bool):
    """(the teacher's forward output, its Head) on micro-batch `mb`."""
    tcfg = self.cfg.replace(dtype=cfg.dtype, attention_impl=cfg.attention_impl)
    teacher_params = jax.lax.stop_gradient(teacher_params)
    t_out = M.forward(teacher_params, tcfg, mb["tokens"], positions_bt=mb["positions"],
                      segment_ids_bt=mb["segment_ids"], return_hidden=hidden, logits=False)
    return jax.lax.stop_gradient(t_out), distill.Head(teacher_params, tcfg, cfg.logits_chunk)

  def batch_specs(self) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class CachedTopK:
  """The teacher's top-`k` logits come with the batch (`losses.TOPK_KEYS`, (A, B, T, k) each,
  written by `teacher_cache`); the step takes no teacher params.

  Attributes:
    k: logits per token in the cache.
    value_dtype: dtype of the cached values ("float32" or "bfloat16").
  """

  k: int
  value_dtype: str = "float32"

  def targets(self, teacher_params, mb: dict, cfg: TrainConfig, hidden: bool):
    del teacher_params, cfg, hidden
    return {key: mb[key] for key in distill.TOPK_KEYS}, None

  def batch_specs(self) -> dict:
    """Batch entries beyond `BATCH_KEYS`: name -> (trailing shape, dtype)."""
    values, indices = distill.TOPK_KEYS
    return {values: ((self.k,), self.value_dtype), indices: ((self.k,), "int32")}


TeacherSource = LiveTeacher | CachedTopK
# (step, loss, grads) -> (loss, grads), applied to an update before the optimizer; tests use it
# to inject faults (e.g. a NaN loss) into a real step.
StepHook = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# ---------------------------------------------------------------------------- the step


def _micro_losses(model_cfg: LlamaConfig, teacher: TeacherSource | None,
                  dcfg: distill.DistillConfig | None, cfg: TrainConfig,
                  student_transform: Callable[[dict], dict] | None,
                  lora: lora_lib.LoraSpec | None = None):
  """(micro_loss, micro_terms) of one micro-batch: `(params, frozen, mb, norm)` -> (loss,
  metrics), or -> ((rest, hidden) terms, metrics) for the dynamic-alpha split; `frozen` is
  (teacher params, LoRA base or None)."""
  mcfg = model_cfg.replace(dtype=cfg.dtype, attention_impl=cfg.attention_impl)
  hidden = dcfg is not None and dcfg.needs_hidden

  def forward(params, frozen, mb):
    # Final-normed states, not logits: the losses project them `logits_chunk` tokens at a time.
    teacher_params, base = frozen
    model = params["model"]
    if base is not None:  # LoRA: the trained params are adapters on the frozen base
      model = lora_lib.merge(base, model, lora.scale, jnp.dtype(cfg.dtype))
    model = model if student_transform is None else student_transform(model)
    out = M.forward(model, mcfg, mb["tokens"], positions_bt=mb["positions"],
                    segment_ids_bt=mb["segment_ids"], return_hidden=hidden, remat=cfg.remat,
                    logits=False)
    head = distill.Head(model, mcfg, cfg.logits_chunk)
    if cfg.mode == "teacher_correction":
      return out, None, (head, None)
    t_out, t_head = teacher.targets(teacher_params, mb, cfg, hidden)
    return out, t_out, (head, t_head)

  def micro_loss(params, teacher_params, mb, norm):
    out, t_out, heads = forward(params, teacher_params, mb)
    if cfg.mode == "teacher_correction":
      return distill.lm_loss(out, mb["tokens"], mb["segment_ids"], norm, head=heads[0])
    return distill.distillation_loss(out, t_out, mb["tokens"], mb["segment_ids"],
                                     params.get("proj"), dcfg, norm, heads)

  def micro_terms(params, teacher_params, mb, norm):
    out, t_out, heads = forward(params, teacher_params, mb)
    terms, metrics = distill.distillation_terms(out, t_out, mb["tokens"], mb["segment_ids"],
                                                params.get("proj"), dcfg, norm, heads)
    return (terms.rest, terms.hidden), metrics

  return micro_loss, micro_terms


def _accumulator(grad_fn, micro_terms, grad_shardings, dynamic: bool,
                 dcfg: distill.DistillConfig | None):
  """`(params, teacher_params, batch, norm) -> (grads, metrics)` of a global batch, summed
  over its micro-batches (`grad_fn` and `micro_terms` of `_micro_losses`)."""

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def accumulate(params, teacher_params, batch, norm):
    """(grads, metrics) of the global batch, summed over its micro-batches."""
    a = batch["tokens"].shape[0]
    # A dynamic alpha = L_logits / L_hidden is a ratio of global-batch means, which a sum of
    # per-micro-batch ratios is not. alpha is under stop_gradient, so the exact gradient is
    # g_rest + alpha * g_hidden: each micro-batch's single forward pass is pulled back twice
    # (cotangents (1, 0) and (0, 1)) into two accumulators, and alpha is formed once from the
    # summed terms. That costs one more student backward pass and one more param-sized
    # accumulator, but no second forward pass (the teacher runs once per micro-batch). One
    # micro-batch is already the global batch: the plain loss is exact there.
    split = dynamic and a > 1

    def one(mb):
      if split:
        (rest, hid), pull, metrics = jax.vjp(
            lambda p: micro_terms(p, teacher_params, mb, norm), params, has_aux=True)
        on, off = jnp.ones_like(rest), jnp.zeros_like(rest)
        (g_rest,), (g_hid,) = pull((on, off)), pull((off, on))
        return (constrain(g_rest), constrain(g_hid)), (metrics, rest)
      (_, metrics), grads = grad_fn(params, teacher_params, mb, norm)
      return constrain(grads), metrics

    if a == 1:
      return one(jax.tree_util.tree_map(lambda x: x[0], batch))

    def body(carry, mb):
      g, m = one(mb)
      return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None
    zeros = jax.eval_shape(one, jax.tree_util.tree_map(lambda x: x[0], batch))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, metrics), _ = jax.lax.scan(body, zeros, batch)
    if not split:  # a fixed alpha was summed once per micro-batch
      return grads, {k: v / a if k.endswith("alpha") else v for k, v in metrics.items()}
    (g_rest, g_hid), (metrics, rest) = grads, metrics
    terms = distill.LossTerms(rest, dcfg.logit_weight * metrics["distill/kl"],
                              metrics["distill/hidden"])
    _, metrics = distill.combine_terms(terms, metrics, dcfg)
    alpha = metrics["distill/alpha"]
    return jax.tree_util.tree_map(lambda r, h: r + alpha * h, g_rest, g_hid), metrics

  return accumulate


def make_train_step(model_cfg: LlamaConfig, teacher: TeacherSource | LlamaConfig | None,
                    dcfg: distill.DistillConfig | None, cfg: TrainConfig,
                    optimizer: optax.GradientTransformation,
                    grad_shardings: Any = None,
                    student_transform: Callable[[dict], dict] | None = None,
                    hook: StepHook | None = None,
                    lora: lora_lib.LoraSpec | None = None) -> Callable:
  """`(state, teacher_params, batch) -> (state, metrics)` for the configured mode.

  Args:
    model_cfg: config of the trained model (its dtype is replaced by `cfg.dtype`).
    teacher: where the distillation targets come from (distill mode): a `LiveTeacher` (a
      bare `LlamaConfig` means one) or `CachedTopK` (then `teacher_params` is None).
    dcfg: loss settings with a resolved layer map (distill mode).
    cfg: train settings.
    optimizer: from `make_optimizer(cfg)`.
    grad_shardings: sharding of `state["params"]`, to pin the gradient accumulator.
    student_transform: applied to the trained model's params inside the loss (e.g.
      quantization-aware distillation's fake quantization, `quantize.qad`).
    hook: applied to the update's loss and gradients before the optimizer (fault injection).
    lora: the adapters' settings when the state holds a frozen `base` (`init_state`).
  """
  if isinstance(teacher, LlamaConfig):
    teacher = LiveTeacher(teacher)
  if isinstance(teacher, CachedTopK):
    distill.check_topk_targets(dcfg)
  dynamic = dcfg is not None and dcfg.needs_hidden and dcfg.hidden_weight is None
  micro_loss, micro_terms = _micro_losses(model_cfg, teacher, dcfg, cfg, student_transform, lora)
  accumulate = _accumulator(jax.value_and_grad(micro_loss, has_aux=True), micro_terms,
                           grad_shardings, dynamic, dcfg)

  def step(state, teacher_params, batch):
    # Counts of the whole global batch, so summing micro-batch losses gives the global mean.
    norm = jax.vmap(distill.normalizers)(batch["tokens"], batch["segment_ids"])
    norm = distill.Normalizers(*(jnp.sum(x) for x in norm))
    params = state["params"]
    grads, metrics = accumulate(params, (teacher_params, state.get("base")), batch, norm)
    prefix = "train" if cfg.mode == "teacher_correction" else "distill"
    loss = metrics[f"{prefix}/loss"]
    if hook is not None:
      loss, grads = hook(state["step"], loss, grads)
      metrics[f"{prefix}/loss"] = loss
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics.update({
        "train/lr": learning_rate(state["step"], cfg),
        "train/grad_norm": optax.global_norm(grads),
        "train/tokens": norm.tokens,
    })
    if prefix == "distill":
      metrics["train/loss"] = loss
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if "base" in state:
      new_state["base"] = state["base"]
    return new_state, metrics

  return step


def abstract_batch(mesh: Mesh, cfg: TrainConfig, teacher: TeacherSource | None = None
                   ) -> tuple[dict, dict]:
  """(shardings, ShapeDtypeStructs) of one global batch, with the teacher source's entries."""
  batch_sh = dict(batch_shardings(mesh))
  shape = (cfg.accum_steps, cfg.micro, cfg.seq_len)
  structs = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s) for k, s in batch_sh.items()}
  specs = teacher.batch_specs() if teacher is not None else {}
  for key, (trailing, dtype) in specs.items():
    s = NamedSharding(mesh, P(None, batch_sh["tokens"].spec[1], None,
                              *(None for _ in trailing)))
    batch_sh[key] = s
    structs[key] = jax.ShapeDtypeStruct(shape + tuple(trailing), jnp.dtype(dtype), sharding=s)
  return batch_sh, structs


def compile_step(step_fn: Callable, state_sh, teacher_sh, mesh: Mesh, abstract_state,
                 abstract_teacher, cfg: TrainConfig, teacher: TeacherSource | None = None):
  """Jits with in/out shardings (state donated, teacher not) and compiles ahead of time.

  Args:
    teacher: the step's teacher source; a `CachedTopK` adds its entries to the batch.

  Returns:
    (compiled, memory_analysis or None).
  """
  batch_sh, structs = abstract_batch(mesh, cfg, teacher)
  jitted = jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_sh),
                   out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
  return compile_on_mesh(jitted, mesh, abstract_state, abstract_teacher, structs)


def compile_on_mesh(jitted, mesh, *abstract_args):
  """(compiled, memory analysis or None) of `jitted` lowered under `mesh`, where the model
  constrains its activations and shard-maps its attention kernels."""
  with sharding.use_mesh(mesh):
    compiled = jitted.lower(*abstract_args).compile()
  try:
    mem = compiled.memory_analysis()
  except Exception:  # not every backend reports it
    mem = None
  return compiled, mem


def format_memory(mem) -> str:
  if mem is None:
    return "memory analysis unavailable on this backend"
  gib = 1024 ** 3
  fields = [("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
            ("temporaries", "temp_size_in_bytes"), ("aliased", "alias_size_in_bytes"),
            ("code", "generated_code_size_in_bytes")]
  parts = [f"{name} {getattr(mem, attr) / gib:.3f} GiB" for name, attr in fields
           if hasattr(mem, attr)]
  return "compiled step memory per device: " + ", ".join(parts)


# ---------------------------------------------------------------------------- evaluation


def make_eval_fn(model_cfg: LlamaConfig, cfg: TrainConfig, mesh: Mesh, params_sh,
                 lora: lora_lib.LoraSpec | None = None) -> Callable:
  """Jitted `(model_params, windows_bt, weights_b) -> (nll sum, predicted tokens)`; with
  `lora`, the params are `eval_params(state)` (base and adapters, merged here)."""
  mcfg = model_cfg.replace(dtype=cfg.dtype, attention_impl=cfg.attention_impl)
  row = sharding.logical_to_spec(("batch",), mesh=mesh)[0]

  def nll(params, windows_bt, weights_b):
    if lora is not None:
      params = lora_lib.merge(params["base"], params["adapters"], lora.scale,
                              jnp.dtype(cfg.dtype))
    normed = M.forward(params, mcfg, windows_bt[:, :-1], logits=False)["normed"]
    per_bt = M.token_scores_bt(params, mcfg, normed, windows_bt[:, 1:], cfg.logits_chunk)[0]
    return jnp.sum(per_bt * weights_b[:, None]), jnp.sum(weights_b) * per_bt.shape[1]

  rep = replicated(mesh)
  jitted = jax.jit(nll, in_shardings=(params_sh, NamedSharding(mesh, P(row, None)),
                                      NamedSharding(mesh, P(row))),
                   out_shardings=(rep, rep))

  def call(*args):
    with sharding.use_mesh(mesh):  # traced (once) with activation constraints over the mesh
      return jitted(*args)
  return call


def evaluate_windows(eval_fn: Callable, params, windows: np.ndarray, batch: int, mesh: Mesh
                     ) -> dict[str, float]:
  """Mean next-token loss and perplexity over `windows` (N, T), every host calling."""
  row = sharding.logical_to_spec(("batch",), mesh=mesh)[0]
  shards = int(np.prod([mesh.shape[a] for a in _names(row)]))
  batch = -(-batch // shards) * shards
  total, count = 0.0, 0.0
  for i in range(0, len(windows), batch):
    chunk = windows[i:i + batch]
    weights = np.zeros(batch, np.float32)
    weights[:len(chunk)] = 1.0
    if len(chunk) < batch:  # pad the batch, not the shape: one compile
      chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), chunk.shape[1]), np.int32)])
    w_sh = NamedSharding(mesh, P(row, None))
    x = put_global(chunk, w_sh)
    wt = put_global(weights, NamedSharding(mesh, P(row)))
    s, c = eval_fn(params, x, wt)
    total += float(s)
    count += float(c)
  loss = total / max(count, 1.0)
  return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 80.0))}
