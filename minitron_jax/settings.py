"""What every stage's job shares: settings errors named in the caller's words, the mesh spec
and the calibration-data spec.

A job (`prune.run.PruneJob`, `distill.run.DistillJob`, ...) is a frozen dataclass that holds
its settings and their defaults, and validates them before any work. A bad value raises
`SettingError` naming the job's own field; the caller renames it into its vocabulary, so a
launch script's user reads `--calib_samples` and a recipe's user reads `prune.calib_samples`:

    with settings.named(flag_names):      # launch scripts: field -> "--flag"
      job.validate()

Core module: imports nothing from the stage packages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Mapping


class SettingError(ValueError):
  """A setting is wrong. `field` is the job's dotted field name (`calib.samples`);
  `template` says what is wrong with `{name}` where the setting's name goes."""

  def __init__(self, field: str, template: str):
    self.field = field
    self.template = template
    super().__init__(template.format(name=field))

  def renamed(self, name: str) -> "SettingError":
    err = SettingError(self.field, self.template)
    err.args = (self.template.format(name=name),)
    return err


def flag_names(overrides: Mapping[str, str] | None = None) -> Callable[[str], str]:
  """Field -> launch-script flag: `--` and the field's last part (`calib.samples` ->
  `--calib_samples` through `overrides`, else `--samples`)."""
  overrides = dict(overrides or {})

  def name(field: str) -> str:
    return overrides.get(field) or "--" + field.rsplit(".", 1)[-1]
  return name


def config_names(keys: Mapping[str, str], section: str = "") -> Callable[[str], str]:
  """Field -> recipe config key (`keys[field]`, else `section.field`)."""
  def name(field: str) -> str:
    if field in keys:
      return keys[field]
    return f"{section}.{field}" if section else field
  return name


@contextlib.contextmanager
def named(namer: Callable[[str], str] | Mapping[str, str]) -> Iterator[None]:
  """Re-raises a `SettingError` with its setting named by `namer` (a function or a mapping;
  a field the mapping lacks keeps its own name)."""
  fn = namer if callable(namer) else (lambda f: namer.get(f, f))
  try:
    yield
  except SettingError as e:
    raise e.renamed(fn(e.field)) from None


def check_positive(obj, *fields: str, prefix: str = "") -> None:
  """Raises SettingError for the first of `fields` that is not an integer >= 1."""
  for f in fields:
    v = getattr(obj, f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise SettingError(prefix + f, f"{{name}}={v!r} must be an integer >= 1")


def check_non_negative(obj, *fields: str, prefix: str = "") -> None:
  """Raises SettingError for the first of `fields` that is not an integer >= 0."""
  for f in fields:
    v = getattr(obj, f)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise SettingError(prefix + f, f"{{name}}={v!r} must be an integer >= 0")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """A device mesh as text: `"data:2,fsdp:2,tensor:2"` (one size may be -1: the remaining
  devices), or `""` for one device without sharding.

  Training always runs on a mesh (`""` means `data:-1` there); the forward-only stages
  (importance, calibration, evaluation) run unsharded for `""` and for `data:-1`, where
  sharding the parameters over data-parallel replicas would only copy them.
  """

  spec: str = ""

  def validate(self, field: str = "mesh") -> None:
    from minitron_jax import sharding

    if self.spec in ("", "data:-1"):  # always valid: no need to start a backend to say so
      return
    try:
      sharding.parse_mesh(self.train_spec)
    except ValueError as e:
      raise SettingError(field, f"{{name}}: {e}") from None

  @property
  def train_spec(self) -> str:
    return self.spec or "data:-1"

  @property
  def stage_spec(self) -> str:
    return "" if self.spec in ("", "data:-1") else self.spec

  def train_mesh(self):
    """The training mesh (always a `jax.sharding.Mesh`)."""
    from minitron_jax import sharding
    return sharding.make_mesh(self.train_spec)

  def stage_mesh(self):
    """The mesh of a forward-only stage, or None (plain single-device arrays)."""
    from minitron_jax import sharding
    return sharding.stage_mesh(self.stage_spec)
