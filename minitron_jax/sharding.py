"""Everything about device placement: mesh, logical-axis rules, shardings, multi-host init.

Parameters carry logical axis names (`axes.PARAM_SPECS`); `RULES` maps each to a mesh axis.
Activations are constrained inside the model by the same rules (`constrain`, with "batch" and
"seq" besides the parameter names) whenever a mesh is set (`jax.set_mesh`, see `use_mesh`).
The same code runs on one CPU (a 1x1x1 mesh), one GPU, or a multi-host pod.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minitron_jax import axes
from minitron_jax.config import LlamaConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None: replicated). Activations use "batch" / "seq".
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    (axes.VOCAB, "tensor"),
    (axes.EMBED, "fsdp"),
    (axes.Q_HEADS, "tensor"),
    (axes.KV_HEADS, "tensor"),
    (axes.HEAD_DIM, None),
    (axes.MLP, "tensor"),
    (axes.LAYERS, None),
)


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """`"data:2,fsdp:2,tensor:2"` -> sizes for every mesh axis (missing ones are 1).

  One size may be -1 (take the remaining devices). The product must equal the device count.
  """
  num_devices = num_devices or jax.device_count()
  sizes = {a: 1 for a in MESH_AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition(":")
    if name not in MESH_AXES:
      raise ValueError(f"mesh {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"mesh {spec!r}: {part!r} is not axis:size") from None
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
    raise ValueError(f"mesh {spec!r}: sizes must be positive (at most one -1)")
  if free:
    rest = int(np.prod([n for n in sizes.values() if n != -1]))
    if num_devices % rest:
      raise ValueError(f"mesh {spec!r} does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // rest
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"mesh {spec!r}: product {int(np.prod(list(sizes.values())))} != "
                     f"{num_devices} devices")
  return sizes


def make_mesh(spec: str = "data:-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices or jax.devices())
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU or odd topologies: plain order is fine
    arr = np.array(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def stage_mesh(spec: str | None) -> Mesh | None:
  """The mesh a stage runs on: None for an empty spec (plain single-device arrays, no
  sharding), else `make_mesh(spec)` over every device of every process."""
  return make_mesh(spec) if spec else None


def logical_to_spec(names: Sequence[str | None], rules=RULES, mesh: Mesh | None = None
                    ) -> P:
  """PartitionSpec for logical axis names; a mesh axis is used at most once per array."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      targets = tuple(t for t in targets if mesh.shape[t] > 1)
    if any(t in used for t in targets):
      targets = ()
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*out)


def _divisible(shape, spec: P, mesh: Mesh) -> P:
  """Drops a mesh axis from a dimension it does not divide (e.g. 9 heads on tensor:2)."""
  out = []
  for dim, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (s,) if isinstance(s, str) else tuple(s or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    out.append(s if size and dim % size == 0 else None)
  return P(*out)


def active_mesh():
  """The mesh set by `jax.set_mesh` (abstract while tracing), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  # Inside shard_map the caller places data by hand: nothing to constrain there.
  return None if mesh.empty or mesh.manual_axes else mesh


def activation_spec(shape: Sequence[int], names: Sequence[str | None], mesh, rules=RULES) -> P:
  """PartitionSpec of an activation with logical axis names, on `mesh` (divisible axes only)."""
  return _divisible(shape, logical_to_spec(names, rules, mesh), mesh)


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
  """Pins an activation's sharding by the logical-axis rules, e.g.
  `constrain(x_btd, ("batch", "seq", axes.EMBED))`. A no-op when no mesh is set, so the model
  runs unchanged on one device; a mesh axis that does not divide a dimension is left out."""
  mesh = active_mesh()
  if mesh is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"{len(names)} axis names {tuple(names)} for an array of shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, names, mesh, rules))


_PLATFORM = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Context in which traced model code constrains its activations over `mesh` and knows the
  platform it is compiled for (`mesh_platform`), e.g. TPUs compiled for from a CPU host."""
  previous = getattr(_PLATFORM, "value", None)
  _PLATFORM.value = mesh.devices.flat[0].platform
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _PLATFORM.value = previous


def mesh_platform() -> str:
  """The platform of the mesh set by `use_mesh`, else the default backend."""
  return getattr(_PLATFORM, "value", None) or jax.default_backend()


class MeshJit:
  """`jax.jit(fn)` traced, lowered and run under `use_mesh(mesh)`, so the model constrains
  its activations and runs its attention kernels per shard. Outputs are replicated (results
  any host can read) unless `out_shardings` is given, or left to XLA with `replicate=False`."""

  def __init__(self, fn, mesh: Mesh, replicate: bool = True, **kw):
    if replicate:
      kw.setdefault("out_shardings", replicated(mesh))
    self.mesh, self.jitted = mesh, jax.jit(fn, **kw)

  def __call__(self, *args, **kwargs):
    with use_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with use_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def jit_on(fn, mesh: Mesh | None, **kw):
  """`jax.jit(fn, **kw)` without a mesh, else a `MeshJit`."""
  return jax.jit(fn, **kw) if mesh is None else MeshJit(fn, mesh, **kw)


def param_shardings(cfg: LlamaConfig, mesh: Mesh, rules=RULES, params=None) -> dict:
  """Tree of NamedSharding matching the param tree."""
  leaves = []
  for spec in axes.param_specs(cfg):
    shape = axes.shape(spec, cfg) if params is None else axes.get(params, spec).shape
    pspec = _divisible(shape, logical_to_spec(spec.axes, rules, mesh), mesh)
    leaves.append((spec, NamedSharding(mesh, pspec)))
  return axes.tree_from_leaves(leaves)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + ("seq",) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_global(tree, shardings):
  """Host values (identical on every process) -> global arrays with the given shardings.

  Each process materialises only its addressable shards, which also works across hosts.
  """
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, tree, shardings)


def batch_shards(mesh: Mesh, rules=RULES) -> int:
  """How many ways the rows of a batch are split (the product of the `batch` mesh axes)."""
  spec = logical_to_spec(("batch",), rules, mesh)[0]
  names = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[n] for n in names]))


def padded_rows(n: int, mesh: Mesh | None) -> int:
  """`n` rounded up to a multiple of the batch shards (unchanged without a mesh)."""
  k = 1 if mesh is None else batch_shards(mesh)
  return -(-n // k) * k


def host_params(params):
  """Every process gets full host copies (collective); a single process keeps device arrays."""
  if jax.process_count() == 1:
    return params
  from jax.experimental import multihost_utils
  return jax.tree_util.tree_map(lambda x: np.asarray(multihost_utils.process_allgather(
      x, tiled=True)), params)


def shard_params(params, cfg: LlamaConfig, mesh: Mesh, rules=RULES):
  """A param tree on `mesh`, every leaf sharded by the logical-axis rules.

  Leaves already laid out that way are kept (so a stage can take params another stage
  placed, on any number of hosts); host arrays are put with `put_global`, each process
  filling only its own shards. Quantized leaves (a pytree of values and scales) are
  replicated.
  """
  def place(x, s):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
      return x
    return put_global(x, s)

  rep = replicated(mesh)
  items = []
  for spec, leaf in axes.iter_leaves(params, cfg):
    if hasattr(leaf, "dequantize"):
      items.append((spec, jax.tree_util.tree_map(lambda x: place(x, rep), leaf)))
      continue
    pspec = _divisible(leaf.shape, logical_to_spec(spec.axes, rules, mesh), mesh)
    items.append((spec, place(leaf, NamedSharding(mesh, pspec))))
  return axes.tree_from_leaves(items)


def shard_rows(x, mesh: Mesh, rules=RULES) -> jax.Array:
  """A host batch `(B, ...)`, identical on every process, as a global array with its rows
  split over the batch mesh axes. `B` must be a multiple of `batch_shards(mesh)` (see
  `padded_rows`); each process transfers only the rows its devices hold."""
  x = np.asarray(x)
  if x.shape[0] % batch_shards(mesh, rules):
    raise ValueError(f"{x.shape[0]} rows do not split over {batch_shards(mesh, rules)} batch "
                     f"shards of mesh {dict(mesh.shape)}")
  names = ("batch",) + (None,) * (x.ndim - 1)
  return put_global(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Multi-host init from explicit flags, or from the cluster environment (TPU pods, SLURM,
  Open MPI, Kubernetes) when none are given. A single process needs nothing."""
  if coordinator_address or num_processes:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _in_cluster(os.environ):
    jax.distributed.initialize()


def _in_cluster(env: Mapping[str, str]) -> bool:
  keys = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
          "JAX_COORDINATOR_ADDRESS")
  return any(k in env for k in keys) and env.get("SLURM_NTASKS", "2") != "1"
