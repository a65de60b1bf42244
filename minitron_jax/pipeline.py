"""The recipe as resumable stages in one run directory.

Each stage writes its outputs atomically and is skipped when they already exist, so running
the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from minitron_jax import cli


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  output: str  # file (relative to the run dir) whose presence marks the stage done
  run: Callable[[Any, str], None]


def _cfg_get(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value in ("", 0, None) else value


def data_root(cfg) -> str:
  return _cfg_get(cfg, "data_root") or cli.default_data_root()


def stage_fetch(cfg, run_dir: str) -> None:
  from minitron_jax import hf_io, registry

  path = str(registry.resolve_model_dir(cfg.teacher))
  model_cfg = hf_io.load_config(path)
  cli.write_json(os.path.join(run_dir, "teacher.json"),
                 {"model_dir": path, "config": model_cfg.to_hf()})


def _teacher_dir(run_dir: str) -> str:
  with open(os.path.join(run_dir, "teacher.json")) as f:
    return json.load(f)["model_dir"]


def stage_evaluate(cfg, run_dir: str) -> None:
  from minitron_jax import evaluate

  params, mcfg, tok, path = cli.load_model(_teacher_dir(run_dir), cfg.dtype)
  root = data_root(cfg)
  e = cfg.eval
  res = evaluate.run_evaluation(
      params, mcfg, tok, list(e.tasks), data_root=root,
      ppl_file=_cfg_get(e, "ppl_file") or os.path.join(root, "wikitext-2", "test.txt"),
      seq_len=e.seq_len, max_windows=_cfg_get(e, "max_windows"), limit=_cfg_get(e, "limit"),
      batch_size=e.batch_size)
  print(evaluate.format_table(list(res.items()), ["ppl", "acc", "acc_norm", "tokens",
                                                  "examples", "seconds"]))
  cli.write_json(os.path.join(run_dir, "eval_teacher.json"), {"model_dir": path, "results": res})


def stage_generate(cfg, run_dir: str) -> None:
  from minitron_jax import generate

  params, mcfg, tok, path = cli.load_model(_teacher_dir(run_dir), cfg.dtype)
  g = cfg.generate
  prompts = [generate.encode_prompt(tok, p, chat=g.chat) for p in g.prompts]
  res = generate.generate(params, mcfg, prompts,
                          generate.SamplingConfig(max_new_tokens=g.max_new_tokens),
                          eos_ids=generate.eos_ids(mcfg, tok))
  samples = [{"prompt": p, "completion": tok.decode(t, skip_special_tokens=True)}
             for p, t in zip(g.prompts, res.tokens)]
  for s in samples:
    print(f"### {s['prompt']}\n{s['completion']}\n")
  cli.write_json(os.path.join(run_dir, "samples_teacher.json"),
                 {"model_dir": path, "samples": samples,
                  "decode_tokens_per_second": res.decode_tokens_per_second})


STAGES = (
    Stage("fetch", "teacher.json", stage_fetch),
    Stage("evaluate", "eval_teacher.json", stage_evaluate),
    Stage("generate", "samples_teacher.json", stage_generate),
)


def run(cfg, stages=STAGES) -> str:
  """Runs every stage whose output is missing; returns the run directory."""
  run_dir = os.path.abspath(cfg.run_dir)
  os.makedirs(run_dir, exist_ok=True)
  cli.write_json(os.path.join(run_dir, "config.json"), json.loads(cfg.to_json()))
  for stage in stages:
    out = os.path.join(run_dir, stage.output)
    if os.path.exists(out):
      print(f"[{stage.name}] done already ({stage.output}), skipping")
      continue
    print(f"[{stage.name}] running")
    t0 = time.perf_counter()
    stage.run(cfg, run_dir)
    print(f"[{stage.name}] finished in {time.perf_counter() - t0:.1f}s")
  print(f"run directory: {run_dir}")
  return run_dir
