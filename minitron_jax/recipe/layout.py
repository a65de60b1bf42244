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
