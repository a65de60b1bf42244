"""One sparsity run: HF checkpoint -> sparse params -> export + sparsify_report.json."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from minitron_jax.data.calib import CalibSpec
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.settings import MeshSpec, SettingError, check_positive
from minitron_jax.sparsify import apply
from minitron_jax.sparsify import export as sparse_export
from minitron_jax.sparsify import methods
from minitron_jax.sparsify.methods import Pattern

REPORT_FILE = "sparsify_report.json"


@dataclasses.dataclass(frozen=True)
class SparsifyJob:
  """A sparse export of one checkpoint: its settings and their defaults.

  Attributes:
    model_dir: HF directory, known short name or hub id.
    output_dir: output directory (written atomically).
    method: 'magnitude', 'wanda' or 'sparsegpt' (`methods.METHODS`).
    pattern: 'N:M' (e.g. '2:4', '4:8') or 'unstructured'.
    sparsity: fraction of zeros of an unstructured pattern.
    export: a key of `export.EXPORT_FORMATS` ('dense', 'sparse24', 'sparse24_fp8',
      'sparse24_int8').
    overwrite: replace a non-empty `output_dir`.
    calib: calibration windows of Wanda and SparseGPT (`calib.data` empty: none).
    damp: SparseGPT's Hessian dampening (fraction of the mean diagonal).
    block_size: SparseGPT's columns per block (unstructured masks are chosen per block).
    dense_dtype: dtype of the exported float tensors.
    ppl_file: UTF-8 text for perplexity before/after; None skips it.
    seq_len, max_windows: perplexity windows.
    progress: print progress lines.
    mesh: shards the perplexity forward passes.
  """

  model_dir: str
  output_dir: str
  method: str = "sparsegpt"
  pattern: str = "2:4"
  sparsity: float = 0.5
  export: str = "dense"
  overwrite: bool = False
  calib: CalibSpec = CalibSpec(data="", samples=64, seq_len=512)
  damp: float = 0.01
  block_size: int = 128
  dense_dtype: str = "bfloat16"
  ppl_file: str | None = None
  seq_len: int = 512
  max_windows: int = 8
  progress: bool = True
  mesh: MeshSpec = MeshSpec()

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    if self.method not in methods.METHODS:
      raise SettingError("method", f"{{name}}={self.method!r} is not a sparsity method; known: "
                         f"{', '.join(methods.METHODS)}")
    pattern = self.parsed_pattern()
    if self.export not in sparse_export.EXPORT_FORMATS:
      raise SettingError("export", f"{{name}}={self.export!r} is not a sparse export; known: "
                         f"{', '.join(sparse_export.EXPORT_FORMATS)}")
    try:
      sparse_export.check_export(self.export, pattern)
    except ValueError as e:
      raise SettingError("export", f"{{name}}: {e}") from None
    if self.dense_dtype not in ("bfloat16", "float16", "float32"):
      raise SettingError("dense_dtype", f"{{name}}={self.dense_dtype!r} is not bfloat16, "
                         "float16 or float32")
    if self.method in methods.CALIBRATED:
      self.calib.validate()
    elif self.calib.data:
      raise SettingError("calib.data", "{name} is used by the calibrated methods only "
                         f"({', '.join(methods.CALIBRATED)})")
    check_positive(self, "block_size", "seq_len", "max_windows")
    if self.damp < 0:
      raise SettingError("damp", f"{{name}}={self.damp} must be >= 0")
    if self.method == "sparsegpt" and pattern.structured and self.block_size % pattern.m:
      raise SettingError("block_size", f"{{name}}={self.block_size} must be a multiple of "
                         f"M={pattern.m}")
    self.mesh.validate()

  def parsed_pattern(self) -> Pattern:
    return Pattern.parse("" if self.pattern == "unstructured" else self.pattern, self.sparsity)


def prepare(job: SparsifyJob):
  """Every check before any weight is read; returns (pattern, source dir, config)."""
  from minitron_jax.io import registry

  job.validate()
  files.check_output_dir(os.path.abspath(job.output_dir), job.overwrite)
  if job.ppl_file is not None and not os.path.isfile(job.ppl_file):
    raise SettingError("ppl_file", f"{{name}}={job.ppl_file}: no such file")
  path = str(registry.resolve_model_dir(job.model_dir))
  cfg = hf_io.load_config(path)
  pattern = job.parsed_pattern()
  try:
    apply.check_model(cfg, pattern)
  except ValueError as e:
    raise SettingError("pattern", f"{{name}}: {e}") from None
  return pattern, path, cfg


def run(job: SparsifyJob) -> dict:
  """Loads the checkpoint, sparsifies it, exports it with `sparsify_report.json`; returns the
  report. Every input is checked before any weight is read."""
  t0 = time.perf_counter()
  pattern, path, cfg = prepare(job)
  params, cfg, tok, _ = hf_io.load_model(path)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  report: dict[str, Any] = {"model_dir": path, "output_dir": os.path.abspath(job.output_dir),
                            "method": job.method, "pattern": pattern.name,
                            "export": job.export}
  batches = None
  if job.method in methods.CALIBRATED:
    from minitron_jax.data import corpus

    batches = job.calib.batches(job.calib.windows(corpus.load_tokens(job.calib.data, tok)))
    report["calibration"] = {"data": job.calib.data, "samples": job.calib.samples,
                             "seq_len": job.calib.seq_len}
  ts = time.perf_counter()
  sparse = apply.sparsify_params(params, cfg, job.method, pattern, batches,
                                 block_size=job.block_size, damp=job.damp,
                                 progress=job.progress)
  report["sparsify_seconds"] = round(time.perf_counter() - ts, 2)
  report["sparsity"] = apply.sparsity_stats(sparse, cfg, pattern)

  stored = sparse_export.stored_params(sparse, cfg, job.export, job.dense_dtype)
  if job.ppl_file is not None:
    report["perplexity"] = _perplexity(job, params, stored, cfg, tok)

  def finish(tmp: str) -> None:
    report["size_bytes"] = files.weight_bytes(tmp)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    files.write_json(os.path.join(tmp, REPORT_FILE), report)

  sparse_export.write_export(stored, cfg, job.export, pattern, job.output_dir, path,
                             sparsity=report["sparsity"]["sparsity"], overwrite=job.overwrite,
                             extra_files=finish)
  return report


def _perplexity(job: SparsifyJob, before: dict, after: dict, cfg, tok) -> dict:
  from minitron_jax.evaluate import scoring

  ids = scoring.file_tokens(tok, job.ppl_file)
  mesh = job.mesh.stage_mesh()
  res = [scoring.perplexity(p, cfg, ids, seq_len=job.seq_len, max_windows=job.max_windows,
                            batch_size=1, progress=job.progress, mesh=mesh,
                            bos_id=scoring.bos_prefix(tok))
         for p in (before, after)]
  return {"file": os.path.abspath(job.ppl_file), "before": res[0]["ppl"],
          "after": res[1]["ppl"], "increase": res[1]["ppl"] - res[0]["ppl"],
          "tokens": res[1]["tokens"], "windows": res[1]["windows"]}


def format_report(report: dict) -> str:
  """A few human lines summarising a report."""
  s = report["sparsity"]
  lines = [f"wrote {report['output_dir']} ({report['export']}, {report['method']} "
           f"{report['pattern']}: {s['sparsity']:.1%} of the linear weights zero, "
           f"{report['size_bytes'] / 1e6:.1f} MB)"]
  if "perplexity" in report:
    p = report["perplexity"]
    lines.append(f"perplexity {p['before']:.3f} -> {p['after']:.3f} "
                 f"({p['windows']} windows, {p['tokens']} tokens)")
  return "\n".join(lines)
