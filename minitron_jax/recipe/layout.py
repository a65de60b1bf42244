"""Where a recipe run keeps each stage's outputs, and the run's settings read with defaults."""

from __future__ import annotations

import json
import os

from minitron_jax.evaluate import tasks


MODEL_STAGES = ("teacher", "corrected", "pruned_width", "pruned_depth", "distill_width",
                "distill_depth", "baseline_pruned_ce", "baseline_random_ce", "pruned_search",
                "distill_search")


def get(cfg, dotted: str, default=None):
  node = cfg
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return default if node in ("", None) else node


def data_sources(cfg) -> tuple[str, ...]:
  """The training sources: `data.source` is one name or a tuple of names."""
  src = cfg.data.source
  return (src,) if isinstance(src, str) else tuple(src)


def data_weights(cfg) -> tuple[float, ...]:
  """One positive weight per training source (`data.weights`; () = equal shares). A single
  source takes all the weight, so `--config.data.source=NAME` alone replaces a default
  mixture. Raises SettingError for a count that does not match or a weight that is not
  positive."""
  from minitron_jax.settings import SettingError

  names = data_sources(cfg)
  if len(names) == 1:
    return (1.0,)
  weights = tuple(get(cfg, "data.weights") or (1.0,) * len(names))
  if len(weights) != len(names):
    raise SettingError("data.weights", f"{{name}}={weights} has {len(weights)} entries for the "
                       f"{len(names)} sources of data.source: give one weight per source, or "
                       "--config.data.weights='()' for equal shares")
  bad = [f"{n}={w}" for n, w in zip(names, weights) if not w > 0]
  if bad:
    raise SettingError("data.weights", f"{{name}}: every weight must be positive ({bad[0]})")
  return weights


def data_root(cfg) -> str:
  return get(cfg, "data_root") or tasks.default_data_root()


def training_data(run_dir: str) -> str:
  """The training data every training and calibrating stage reads: a blend file
  (`data.blend`) of the mixed text and any prepared or Megatron sources."""
  return os.path.join(run_dir, "data", "blend.json")


def training_text(run_dir: str) -> str:
  """The text sources mixed by weight (one entry of the blend)."""
  return os.path.join(run_dir, "data", "train.jsonl")


def read(run_dir: str, rel: str) -> dict:
  with open(os.path.join(run_dir, rel)) as f:
    return json.load(f)


def students_teacher(cfg) -> str:
  """The model the students are pruned and distilled from: the corrected teacher when the run
  corrects it, else the downloaded one."""
  return "corrected" if cfg.correction.steps else "teacher"


def model_dir(run_dir: str, name: str) -> str:
  """HF directory of a model stage."""
  if name == "teacher":
    return read(run_dir, "teacher.json")["model_dir"]
  if name.startswith("pruned_") or name == "sparse":
    return os.path.join(run_dir, name)
  return os.path.join(run_dir, name, "hf")
