"""Proof by compilation: the recipe's stages compiled for a real TPU topology from abstract
inputs only (no weights, no TPU attached).

`jax.experimental.topologies.get_topology_desc` (with `libtpu` installed) describes the chips
of a TPU slice; a `Mesh` over them, `ShapeDtypeStruct`s carrying `NamedSharding`s and
`jit(...).lower(...).compile()` give XLA's real TPU executable, its per-chip
`memory_analysis()` and `cost_analysis()`. Each stage is lowered through the same functions
the recipe runs (the distillation step of `distill.step`, the activation-importance step, the
scorer of evaluation, generation's prefill and decode).

XLA's cost analysis counts the body of a loop once, whatever its trip count, and every model
pass here is a scan over layers (and the TPU compiler makes loops of sharded matmuls, see
`WHOLE_EINSUMS`). Compiled FLOPs are therefore measured on the same stage with one and with
two layers, every scan unrolled and every matmul whole (`measuring`), and extended linearly to
the real depth: cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)), for student and teacher
separately; gradient accumulation is compiled as one micro-batch and multiplied. The cost
analysis counts a Pallas kernel as no FLOPs, so the splash attention kernels' work is added
from their block grid (`flops.splash_flops`) where the compiled program calls them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from minitron_jax import attention
from minitron_jax import flops as F
from minitron_jax import model as M
from minitron_jax import sharding
from minitron_jax.config import LlamaConfig
from minitron_jax.distill import losses as distill_losses
from minitron_jax.distill import step as train
from minitron_jax.evaluate import generate as G
from minitron_jax.evaluate import scoring
from minitron_jax.prune import importance as I

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation.

  Sources: Cloud TPU documentation, "TPU v5p" (95 GiB HBM2e at 2,765 GB/s, 459 bf16
  TFLOP/s) and "TPU v5e" (16 GiB HBM2 at 819 GB/s, 197 bf16 TFLOP/s);
  https://cloud.google.com/tpu/docs/v5p and https://cloud.google.com/tpu/docs/v5e.
  """

  name: str
  hbm_bytes: int
  peak_flops: float       # dense bf16 FLOP/s
  hbm_bandwidth: float    # bytes/s
  cores_per_chip: int     # TensorCores, as counted by the slice names (v5p-64 = 32 chips)


CHIPS = {
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12, 2),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9, 1),
}
# Physical shapes of the slices, by chip count (Cloud TPU topologies).
_SHAPES = {
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"},
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
}


def parse_topology(name: str) -> tuple[Chip, str, int]:
  """`v5p-64` (the Cloud slice name: TensorCores) or `v5p:2x4x4` (libtpu's name: chips per
  dimension) -> (chip, libtpu topology name, chip count)."""
  m = re.fullmatch(r"(v5p|v5e)-(\d+)", name)
  if m:
    gen, cores = m.group(1), int(m.group(2))
    chips = cores // CHIPS[gen].cores_per_chip
    if chips not in _SHAPES[gen]:
      raise ValueError(f"--topology {name!r}: no {gen} slice of {cores} cores "
                       f"(chips: {sorted(_SHAPES[gen])})")
    return CHIPS[gen], f"{gen}:{_SHAPES[gen][chips]}", chips
  m = re.fullmatch(r"(v5p|v5e):(\d+(?:x\d+)+)", name)
  if not m:
    raise ValueError(f"--topology {name!r}: expected e.g. v5p-64, v5e-256 or v5p:2x4x4")
  return CHIPS[m.group(1)], name, int(np.prod([int(d) for d in m.group(2).split("x")]))


def topology_devices(name: str) -> tuple[Chip, list]:
  """The TPU devices of a topology, described by libtpu (no TPU needed)."""
  from jax.experimental import topologies

  chip, libtpu_name, chips = parse_topology(name)
  # Several processes on one machine may load libtpu to describe topologies.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = list(topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name).devices)
  if len(devices) != chips:
    raise ValueError(f"topology {libtpu_name}: libtpu describes {len(devices)} devices, "
                     f"expected {chips}")
  return chip, devices


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


# ---------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def unrolled_scans():
  """While tracing inside, every `jax.lax.scan` is fully unrolled, so XLA's cost analysis
  (which counts a loop body once) sees every iteration. For measurement only."""
  orig = jax.lax.scan

  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    del unroll
    return orig(f, init, xs, length=length, reverse=reverse, unroll=True, **kw)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = orig


# XLA's TPU compiler turns an FSDP all-gather + matmul (and matmul + reduce-scatter) into a
# "windowed einsum": a loop over the shards, each step one shard's slice of the matmul, which
# the cost analysis counts once. Measurement compiles keep every matmul whole: the same
# FLOPs, counted in full.
WHOLE_EINSUMS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": 1 << 30,
                 "xla_tpu_enable_windowed_einsum_for_all_gather": False,
                 "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


@contextlib.contextmanager
def compile_options(options: dict):
  """While inside, every `Lowered.compile` gets these XLA options (e.g. `WHOLE_EINSUMS` for
  TPU compiles that measure FLOPs)."""
  orig = jax.stages.Lowered.compile

  def compile(self, compiler_options=None, **kw):
    return orig(self, {**options, **(compiler_options or {})}, **kw)

  jax.stages.Lowered.compile = compile
  try:
    yield
  finally:
    jax.stages.Lowered.compile = orig


@contextlib.contextmanager
def measuring():
  """Scans unrolled and matmuls whole: what XLA's cost analysis counts in full."""
  with unrolled_scans(), compile_options(WHOLE_EINSUMS):
    yield


@contextlib.contextmanager
def tracing_for_tpu():
  """While tracing inside, the model takes the TPU paths ("auto" attention = Pallas splash,
  compiled, not interpreted) although the tracing host's backend is the CPU: the programs
  are compiled for the topology's chips, never run here."""
  orig = jax.default_backend
  jax.default_backend = lambda: "tpu"
  try:
    yield
  finally:
    jax.default_backend = orig


def _for_tpu(lower: Callable) -> Callable:
  """Runs `lower(...)` under `tracing_for_tpu`, after building the splash kernels of the
  configs and lengths in its arguments on the host: their block-sparsity tables are
  concrete arrays, which cannot be made on the topology's (description-only) devices."""
  def wrapped(*args, **kwargs):
    cfgs = [a for a in args if isinstance(a, LlamaConfig)]
    lengths = [a for a in list(args) + list(kwargs.values())
               if isinstance(a, int) and a >= 128]
    plan = next((a for a in args if isinstance(a, DistillPlan)), None)
    if plan is not None:
      lengths.append(plan.seq_len)
    for cfg in cfgs:
      for t in lengths:
        block = attention._block_size(t, 512)
        attention._splash_kernel(-(-t // block) * block,
                                 cfg.num_attention_heads // cfg.num_key_value_heads, block,
                                 False)
    with tracing_for_tpu():
      return lower(*args, **kwargs)
  wrapped.__doc__, wrapped.__name__ = lower.__doc__, lower.__name__
  return wrapped


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-chip bytes of one compiled executable."""

  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  code: int

  @property
  def peak(self) -> int:
    """Arguments, temporaries and the outputs that do not reuse a donated argument."""
    return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


def memory(compiled) -> Memory:
  m = compiled.memory_analysis()
  return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                int(m.temp_size_in_bytes), int(m.alias_size_in_bytes),
                int(m.generated_code_size_in_bytes))


def cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per chip, as XLA counts them."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


def kernel_calls(compiled) -> bool:
  """Whether a compiled TPU program calls a Pallas (Mosaic) kernel, e.g. splash attention."""
  return 'custom_call_target="tpu_custom_call"' in compiled.as_text()


def _abstract_params(cfg: LlamaConfig, mesh: Mesh, dtype) -> dict:
  shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0), dtype=dtype))
  return train.abstract(shapes, sharding.param_shardings(cfg, mesh))


def _rows(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  names = ("batch",) + (None,) * (len(shape) - 1)
  spec = sharding.logical_to_spec(names, mesh=mesh)
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh: Mesh, tree) -> Any:
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                tree)


# ---------------------------------------------------------------------------- the stages


@dataclasses.dataclass(frozen=True)
class DistillPlan:
  """The distillation step as the recipe runs it."""

  micro_batch_size: int
  accum_steps: int
  seq_len: int = 8192
  remat: bool = True
  dtype: str = "bfloat16"


@_for_tpu
def lower_distill(student: LlamaConfig, teacher: LlamaConfig, mesh: Mesh, plan: DistillPlan):
  """The compiled distillation step (forward KL on logits, AdamW, float32 master weights,
  bf16 compute, teacher in bf16, state donated) at the plan's sizes."""
  cfg = train.TrainConfig(global_batch_size=plan.micro_batch_size * plan.accum_steps,
                          micro_batch_size=plan.micro_batch_size, seq_len=plan.seq_len,
                          dtype=plan.dtype, remat=plan.remat)
  dcfg = distill_losses.DistillConfig()
  opt = train.make_optimizer(cfg)
  state = jax.eval_shape(lambda: train.init_state(M.init_params(student, jax.random.key(0)), opt))
  state_sh = train.state_shardings(state, student, mesh, opt)
  teacher_sh = sharding.param_shardings(teacher, mesh)
  teacher_shape = jax.eval_shape(lambda: M.init_params(teacher, jax.random.key(0),
                                                       dtype=jnp.bfloat16))
  step = train.make_train_step(student, teacher, dcfg, cfg, opt,
                               grad_shardings=state_sh["params"])
  compiled, _ = train.compile_step(step, state_sh, teacher_sh, mesh,
                                   train.abstract(state, state_sh),
                                   train.abstract(teacher_shape, teacher_sh), cfg)
  return compiled


@_for_tpu
def lower_importance(cfg: LlamaConfig, mesh: Mesh, batch: int, seq: int):
  """One calibration batch of activation importance (L2 over batch, mean over sequence)."""
  cfg = cfg.replace(dtype="bfloat16")
  step, init = I.activation_step(cfg, "mean", "l2", mesh)
  params = _abstract_params(cfg, mesh, jnp.bfloat16)
  tokens, weights = _rows(mesh, (batch, seq), jnp.int32), _rows(mesh, (batch,), jnp.float32)
  acc = _replicated(mesh, jax.eval_shape(init, params, tokens, weights))
  return step.lower(params, tokens, weights, acc).compile()


@_for_tpu
def lower_evaluate(cfg: LlamaConfig, mesh: Mesh, batch: int, seq: int):
  """One batch of log-likelihood scoring (perplexity and zero-shot tasks)."""
  cfg = cfg.replace(dtype="bfloat16")
  score = scoring._scorer(cfg, mesh)
  params = _abstract_params(cfg, mesh, jnp.bfloat16)
  ids = _rows(mesh, (batch, seq), jnp.int32)
  return score.lower(params, ids, ids, _rows(mesh, (batch, seq), jnp.bool_)).compile()


def _decode_state(cfg: LlamaConfig, mesh: Mesh, batch: int, cache_len: int, new: int):
  shapes = {"token": jax.ShapeDtypeStruct((batch,), jnp.int32),
            "cache": jax.eval_shape(lambda: M.init_cache(cfg, batch, cache_len)),
            "key": jax.eval_shape(lambda: jax.random.key(0)),
            "out": jax.ShapeDtypeStruct((batch, new), jnp.int32),
            "n": jax.ShapeDtypeStruct((), jnp.int32),
            "done": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
  return train.abstract(shapes, G.state_shardings(mesh))


@_for_tpu
def lower_generate(cfg: LlamaConfig, mesh: Mesh, batch: int, prompt_len: int, new_tokens: int):
  """Generation's prefill of `prompt_len` tokens and its decode loop (`new_tokens` tokens,
  attending to the whole cache): (prefill, decode) compiled."""
  cfg = cfg.replace(dtype="bfloat16")
  prefill, decode = G.make_steps(cfg, mesh)
  params = _abstract_params(cfg, mesh, jnp.bfloat16)
  cache_len = G.bucket(prompt_len + new_tokens)
  state = _decode_state(cfg, mesh, batch, cache_len, G.bucket(new_tokens))
  rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,  # noqa: E731
                                                   sharding=sharding.replicated(mesh))
  scalars = (rep((), jnp.float32), rep((), jnp.float32), rep((4,), jnp.int32))
  no_key = {k: v for k, v in state.items() if k != "key"}
  pre = prefill.lower(params, _rows(mesh, (batch, prompt_len), jnp.int32),
                      _rows(mesh, (batch, prompt_len), jnp.bool_), no_key, state["key"],
                      *scalars).compile()
  dec = decode.lower(params, state, rep((), jnp.int32), *scalars, rep((), jnp.bool_),
                     attend_len=cache_len).compile()
  return pre, dec


# ---------------------------------------------------------------------------- reports


@dataclasses.dataclass
class StageReport:
  """One compiled stage: per-chip memory, FLOPs (compiled and analytic) and the roofline."""

  stage: str
  model: str
  mesh: str
  shape: str                  # the work of one compiled call, in words
  memory: Memory
  hbm_bytes: int
  compiled_flops: float | None  # per chip, per call (loops counted in full); None: not measured
  compiled_bytes: float | None  # per chip, per call
  analytic_flops: float       # per chip, per call (useful work: no recomputation)
  peak_flops: float
  hbm_bandwidth: float
  calls_per_step: int = 1     # e.g. micro-batches per optimizer update
  notes: str = ""
  kernel_flops: float = 0.0   # per chip, per call: the splash kernels' part of compiled_flops
  # Per chip, per call: the useful work, causal attention counted once (the pairs its mask
  # keeps); 0 = `analytic_flops`. MFU divides this, so a causal kernel cannot exceed 100 %.
  useful_flops: float = 0.0

  @property
  def headroom(self) -> float:
    return 1.0 - self.memory.peak / self.hbm_bytes

  @property
  def measured(self) -> bool:
    return self.compiled_flops is not None

  @property
  def flops_ratio(self) -> float:
    return self.compiled_flops / self.analytic_flops if self.measured else float("nan")

  @property
  def roofline_seconds(self) -> float:
    """Per call: the slower of compute at peak and HBM traffic at full bandwidth."""
    if not self.measured:
      return float("nan")
    return max(self.compiled_flops / self.peak_flops, self.compiled_bytes / self.hbm_bandwidth)

  @property
  def bound(self) -> str:
    if not self.measured:
      return "-"
    compute = self.compiled_flops / self.peak_flops
    return "compute" if compute >= self.compiled_bytes / self.hbm_bandwidth else "memory"

  @property
  def mfu(self) -> float:
    """Useful FLOPs (causal attention counted once) over what the chip could do in the
    roofline time."""
    return (self.useful_flops or self.analytic_flops) / (self.roofline_seconds * self.peak_flops)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(memory_peak=self.memory.peak, headroom=self.headroom,
               flops_ratio=self.flops_ratio, roofline_seconds=self.roofline_seconds,
               step_seconds=self.roofline_seconds * self.calls_per_step, bound=self.bound,
               mfu=self.mfu)
    return out


def depth_extended(measure: Callable[[dict[str, int]], tuple[float, float]],
                   depths: dict[str, int]) -> tuple[float, float]:
  """(FLOPs, bytes) at the real depths from measurements at depth 1 and 2 of each model:
  f(1, 1, ...) + sum over models of (depth - 1) * (f(.., 2, ..) - f(1, 1, ...))."""
  ones = {k: 1 for k in depths}
  base = np.array(measure(ones), np.float64)
  total = base.copy()
  for k, d in depths.items():
    if d > 1:
      total += (d - 1) * (np.array(measure({**ones, k: 2}), np.float64) - base)
  return float(total[0]), float(total[1])


def format_table(reports: list[StageReport]) -> str:
  """A Markdown table, one row per stage."""
  head = ("| stage | model | mesh | work per call | args / temps / outputs (GiB per chip) | "
          "peak / HBM | compiled / analytic TFLOP per chip | ratio | roofline per step | MFU |")
  lines = [head, "|" + "---|" * 10]
  for r in reports:
    m = r.memory
    step = r.roofline_seconds * r.calls_per_step
    compiled = f"{r.compiled_flops / 1e12:.2f}" if r.measured else "not measured"
    timing = (f"{r.flops_ratio:.2f} | {_seconds(step)} ({r.bound}) | {r.mfu:.0%}"
              if r.measured else "- | - | -")
    lines.append(
        f"| {r.stage} | {r.model} | {r.mesh} | {r.shape} | {m.arguments / GIB:.2f} / "
        f"{m.temporaries / GIB:.2f} / {m.outputs / GIB:.2f} | {m.peak / GIB:.1f} / "
        f"{r.hbm_bytes / GIB:.0f} GiB ({r.headroom:.0%} free) | "
        f"{compiled} / {r.analytic_flops / 1e12:.2f} | {timing} |")
  return "\n".join(lines)


def _seconds(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def distill_report(student: LlamaConfig, teacher: LlamaConfig, name: str, mesh: Mesh,
                   mesh_spec: str, chip: Chip, plan: DistillPlan, measure: bool = True
                   ) -> StageReport:
  """The compiled step's memory and, with `measure`, its FLOPs (three more compiles)."""
  chips = mesh.devices.size
  mem = memory(lower_distill(student, teacher, mesh, plan))

  kernels = []

  def measure_depth(depth):
    micro = dataclasses.replace(plan, accum_steps=1)
    with measuring():
      c = lower_distill(student.keep_layers(range(depth["student"])),
                        teacher.keep_layers(range(depth["teacher"])), mesh, micro)
    kernels.append(kernel_calls(c))
    return cost(c)

  fl, by = depth_extended(measure_depth, {"student": student.num_hidden_layers,
                                          "teacher": teacher.num_hidden_layers}
                         ) if measure else (None, None)
  analytic = F.distill_flops(student, teacher, plan.micro_batch_size, plan.seq_len,
                             remat=plan.remat)
  # Splash kernels: the student's forward (again when rematerialised) and backward, the
  # teacher's forward.
  b, t = plan.micro_batch_size, plan.seq_len
  block = attention._block_size(t, 512)
  splash = ((2 if plan.remat else 1) * F.splash_flops(student, b, t, block)
            + F.splash_flops(student, b, t, block, "backward")
            + F.splash_flops(teacher, b, t, block)) / chips
  kernel, fl = _with_kernels(fl, splash, kernels)
  return StageReport(
      "distill", name, mesh_spec,
      f"{plan.micro_batch_size} x {plan.seq_len} tokens (x {plan.accum_steps} per update)",
      mem, chip.hbm_bytes, fl, by, analytic.model / chips, chip.peak_flops, chip.hbm_bandwidth,
      calls_per_step=plan.accum_steps,
      notes=f"remat={plan.remat}; analytic incl. recomputation: "
            f"{analytic.total / chips / 1e12:.2f} TFLOP per chip" + _kernel_note(kernel),
      kernel_flops=kernel,
      useful_flops=F.distill_flops(student, teacher, b, t, causal=True).model / chips)


def _with_kernels(xla_flops: float | None, splash: float, kernels: list[bool]
                  ) -> tuple[float, float | None]:
  """(kernel FLOPs, XLA's count plus them): the splash FLOPs where every measured program
  calls the kernels, none where none does; a mix means the accounting is wrong."""
  if xla_flops is None:
    return 0.0, None
  if all(kernels):
    return splash, xla_flops + splash
  if not any(kernels):
    return 0.0, xla_flops
  raise ValueError("some measured programs call the splash kernels and some do not")


def _kernel_note(kernel: float) -> str:
  return (f"; incl. {kernel / 1e12:.2f} TFLOP per chip in splash kernels (from their block "
          f"grid: XLA counts a Pallas kernel as none)" if kernel else "")


def forward_report(stage: str, cfg: LlamaConfig, name: str, mesh: Mesh, mesh_spec: str,
                   chip: Chip, batch: int, seq: int, measure: bool = True) -> StageReport:
  """Importance (`stage="importance"`) or evaluation (`"evaluate"`): one forward batch."""
  lower = lower_importance if stage == "importance" else lower_evaluate
  mem = memory(lower(cfg, mesh, batch, seq))
  kernels = []

  def measure_depth(depth):
    with measuring():
      c = lower(cfg.keep_layers(range(depth["model"])), mesh, batch, seq)
    kernels.append(kernel_calls(c))
    return cost(c)

  fl, by = (depth_extended(measure_depth, {"model": cfg.num_hidden_layers}) if measure
            else (None, None))
  splash = F.splash_flops(cfg, batch, seq, attention._block_size(seq, 512)) / mesh.devices.size
  kernel, fl = _with_kernels(fl, splash, kernels)
  # Importance reads the layers' activations and the final norm: it computes no logits.
  head = F.head_flops(cfg, batch, seq) if stage == "importance" else 0
  analytic, useful = (F.forward_flops(cfg, batch, seq, causal=c) - head for c in (False, True))
  return StageReport(stage, name, mesh_spec, f"{batch} x {seq} tokens", mem, chip.hbm_bytes,
                     fl, by, analytic / mesh.devices.size,
                     chip.peak_flops, chip.hbm_bandwidth, notes=_kernel_note(kernel).lstrip("; "),
                     kernel_flops=kernel, useful_flops=useful / mesh.devices.size)


def generate_reports(cfg: LlamaConfig, name: str, mesh: Mesh, mesh_spec: str, chip: Chip,
                     batch: int, prompt_len: int, new_tokens: int, measure: bool = True
                     ) -> list[StageReport]:
  """Prefill (one call) and decode (per generated token, attending to the full cache)."""
  chips = mesh.devices.size
  pre, dec = lower_generate(cfg, mesh, batch, prompt_len, new_tokens)
  mems = memory(pre), memory(dec)

  def measure_depth(depth):
    with measuring():
      p, d = lower_generate(cfg.keep_layers(range(depth["model"])), mesh, batch,
                            prompt_len, new_tokens)
    if kernel_calls(p) or kernel_calls(d):  # the cached attention is plain XLA
      raise ValueError("generation calls a Pallas kernel, whose FLOPs XLA does not count")
    return cost(p) + cost(d)

  if measure:
    ones = np.array(measure_depth({"model": 1}))
    two = np.array(measure_depth({"model": 2}))
    full = [float(x) for x in ones + (cfg.num_hidden_layers - 1) * (two - ones)]
  else:
    full = [None] * 4
  cache_len = G.bucket(prompt_len + new_tokens)
  return [
      StageReport("generate: prefill", name, mesh_spec, f"{batch} x {prompt_len} tokens",
                  mems[0], chip.hbm_bytes, full[0], full[1],
                  F.forward_flops(cfg, batch, prompt_len) / chips, chip.peak_flops,
                  chip.hbm_bandwidth,
                  useful_flops=F.forward_flops(cfg, batch, prompt_len, causal=True) / chips),
      StageReport("generate: decode", name, mesh_spec,
                  f"{batch} rows x 1 token, cache {cache_len} (x {new_tokens} tokens)",
                  mems[1], chip.hbm_bytes, full[2], full[3],
                  F.decode_flops(cfg, batch, cache_len) / chips, chip.peak_flops,
                  chip.hbm_bandwidth, calls_per_step=new_tokens,
                  notes="the decode loop's body, i.e. one token; XLA counts a loop once"),
  ]
