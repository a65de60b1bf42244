"""One quantization run: HF checkpoint -> quantized params -> export + quantize_report.json."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minitron_jax.data.calib import CalibSpec
from minitron_jax.evaluate import scoring
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.quantize import calibrate
from minitron_jax.quantize import export as quant_export
from minitron_jax.quantize import formats as Q
from minitron_jax.settings import MeshSpec, SettingError, check_positive


@dataclasses.dataclass(frozen=True)
class QuantizeJob:
  """A quantized export of one checkpoint: its settings and their defaults.

  Attributes:
    model_dir: HF directory, known short name or hub id.
    output_dir: output directory (written atomically).
    format: a key of `export.EXPORT_FORMATS`.
    overwrite: replace a non-empty `output_dir`.
    ppl_file: UTF-8 text for perplexity before/after; None skips it.
    seq_len: perplexity window length (also of the FP8 activation calibration windows).
    max_windows: perplexity windows evaluated.
    group_size: INT4 group size.
    include_embeddings: quantize the embedding and LM head too (GGUF only).
    calibration_file: text whose activations set static FP8 input scales (fp8 only).
    calibration_windows: windows of `calibration_file` used.
    unquantized_dtype: dtype of the tensors left unquantized in HF exports.
    gguf_tokenizer_pre: llama.cpp pre-tokenizer name written to GGUF exports; empty: found
      automatically (see `gguf_export.write_gguf`).
    method: 'rtn' (round to nearest), 'gptq', 'awq' or 'awq_gptq' (the INT4 formats and GGUF
      Q4_0; see `calibrate.calibrated_params`); None: `calibrate.default_method`.
    calib: GPTQ / AWQ calibration windows; `calib.data` empty: no calibration data.
    gptq_damp, act_order: see `gptq.gptq`.
    progress: print perplexity and calibration progress.
    mesh: shards the activation-scale calibration and perplexity forward passes (GPTQ's
      layer-by-layer calibration runs on one device).
    frozen_grid: a `qad.FrozenGrid` (of a quantization-aware distillation from a calibrated
      model): the weights are encoded on its grids instead of grids derived here (`method`
      must be None or 'rtn'; the report says 'frozen_grid').
  """

  model_dir: str
  output_dir: str
  format: str
  overwrite: bool = False
  ppl_file: str | None = None
  seq_len: int = 512
  max_windows: int = 4
  group_size: int = Q.DEFAULT_GROUP_SIZE
  include_embeddings: bool = False
  calibration_file: str | None = None
  calibration_windows: int = 4
  unquantized_dtype: str = "bfloat16"
  gguf_tokenizer_pre: str = ""
  method: str | None = None
  calib: CalibSpec = CalibSpec(data="", samples=128, seq_len=512)
  gptq_damp: float = 0.01
  act_order: bool = True
  progress: bool = True
  mesh: MeshSpec = MeshSpec()
  frozen_grid: Any = None

  def validate(self) -> None:
    """Every setting on its own, before any file is read; raises SettingError."""
    if self.format not in quant_export.EXPORT_FORMATS:
      raise SettingError("format", f"{{name}}={self.format!r} is not a known export format; "
                         f"known: {', '.join(quant_export.EXPORT_FORMATS)}")
    fmt = quant_export.EXPORT_FORMATS[self.format]
    if self.include_embeddings and not fmt.is_gguf:
      raise SettingError("include_embeddings", "{name} is supported for the GGUF formats only")
    if self.calibration_file is not None and quant_export.family(fmt) != "fp8":
      raise SettingError("calibration_file", "{name}: static activation calibration is "
                         "supported for the fp8 format only")
    if self.unquantized_dtype not in quant_export.DENSE_DTYPES:
      raise SettingError("unquantized_dtype", f"{{name}}={self.unquantized_dtype!r} is not one "
                         f"of {list(quant_export.DENSE_DTYPES)}")
    check_positive(self, "seq_len", "max_windows", "group_size", "calibration_windows")
    if self.seq_len < 2:
      raise SettingError("seq_len", f"{{name}}={self.seq_len} must be >= 2")
    if self.gptq_damp < 0:
      raise SettingError("gptq_damp", f"{{name}}={self.gptq_damp} must be >= 0")
    self._check_method(fmt)
    self.mesh.validate()

  def _check_method(self, fmt: Q.QuantFormat) -> None:
    method = self.method or calibrate.default_method(fmt, self.calibrated)
    if self.method is not None:
      calibrate.check_method(method, fmt)
    if self.frozen_grid is not None and (method != "rtn" or self.calibration_file is not None
                                         or self.include_embeddings):
      raise SettingError("method", "a frozen grid is encoded as it is: no {name}, static "
                         "activation scales or embedding quantization with it")
    if method in calibrate.CALIBRATED and not self.calibrated:
      raise SettingError("calib.data", f"method={method} needs calibration data: set {{name}}")
    if method == "rtn" and self.calibrated:
      raise SettingError("calib.data", "{name} is used by the calibrated methods only "
                         f"({', '.join(calibrate.CALIBRATED)})")
    if self.calibrated:
      self.calib.validate()

  @property
  def calibrated(self) -> bool:
    """Whether calibration data is given (`calib.data`)."""
    return bool(self.calib.data)

  def resolved_method(self) -> str:
    """The method that runs: 'frozen_grid', the one named, or the format's default."""
    if self.frozen_grid is not None:
      return "frozen_grid"
    return self.method or calibrate.default_method(quant_export.export_format(self.format), self.calibrated)


def prepare(job: QuantizeJob):
  """Every check before any weight is read; returns (format, method, source dir, config)."""
  from minitron_jax.io import registry

  job.validate()
  fmt = quant_export.export_format(job.format)
  files.check_output_dir(os.path.abspath(job.output_dir), job.overwrite)
  for field in ("ppl_file", "calibration_file"):
    f = getattr(job, field)
    if f is not None and not os.path.isfile(f):
      raise SettingError(field, f"{{name}}={f}: no such file")
  path = str(registry.resolve_model_dir(job.model_dir))
  cfg = hf_io.load_config(path)
  Q.check_dims(cfg, fmt, job.group_size, job.include_embeddings)
  quant_export.check_consumers(cfg, fmt, job.include_embeddings)
  if fmt.is_gguf:
    from minitron_jax.quantize import gguf_export
    gguf_export.check_inputs(cfg, path, job.gguf_tokenizer_pre)
  return fmt, job.resolved_method(), path, cfg


def run(job: QuantizeJob) -> dict:
  """Loads the checkpoint, quantizes it, exports it and writes `quantize_report.json`; returns
  the report. Every input is checked before any weight is read."""
  t0 = time.perf_counter()
  fmt, method, path, cfg = prepare(job)
  need_tok = bool(job.ppl_file or job.calibration_file or job.calibrated or fmt.is_gguf)
  params, cfg, tok, _ = hf_io.load_model(path, with_tokenizer=need_tok)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  mesh = job.mesh.stage_mesh()
  qparams, calib = quantized_params(job, params, cfg, tok, fmt, method, mesh)
  qparams = quant_export.export_params(qparams, cfg, fmt, job.unquantized_dtype)
  out = os.path.abspath(job.output_dir)
  report: dict[str, Any] = {"format": job.format, "weight_format": fmt.value, "method": method,
                            "calibration": calib, "model_dir": path, "output_dir": out,
                            "notes": quant_export.notes(cfg, fmt)}
  quant_export.check_exportable(qparams, cfg, fmt)
  with hf_io.atomic_output_dir(out, job.overwrite) as tmp:
    quant_export.write_into(qparams, cfg, fmt, tmp, path, job.gguf_tokenizer_pre)
    report.update(measurements(job, tmp, params, qparams, cfg, tok, mesh))
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(tmp, quant_export.REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
  return report


def quantized_params(job: QuantizeJob, params, cfg, tok, fmt: Q.QuantFormat, method: str,
                     mesh) -> tuple[dict, dict | None]:
  """(quantized params, the calibration's summary or None) of float32 `params`."""
  act = None
  if job.calibration_file is not None:
    ids = scoring.file_tokens(tok, job.calibration_file)
    act = Q.calibrate_activation_scales(params, cfg,
                                        _windows(ids, job.seq_len, job.calibration_windows),
                                        mesh=mesh)
  if method in calibrate.CALIBRATED:
    from minitron_jax.data import corpus

    batches = job.calib.batches(job.calib.windows(corpus.load_tokens(job.calib.data, tok)))
    qparams, secs = calibrate.quantize_with_method(
        params, cfg, fmt, method, batches, include_embeddings=job.include_embeddings,
        group_size=job.group_size, damp=job.gptq_damp, act_order=job.act_order,
        activation_scales=act, progress=job.progress)
    return qparams, {"data": job.calib.data, "samples": job.calib.samples,
                     "seq_len": job.calib.seq_len, "damp": job.gptq_damp,
                     "act_order": job.act_order, "seconds": round(secs, 2)}
  if job.frozen_grid is not None:
    return job.frozen_grid.encode(params), None
  return Q.quantize_params(params, cfg, fmt, include_embeddings=job.include_embeddings,
                           group_size=job.group_size, activation_scales=act), None


def measurements(job: QuantizeJob, out_dir: str, params, qparams, cfg, tok, mesh) -> dict:
  """Size on disk, parameter bytes, per-tensor errors and perplexity before/after."""
  size = files.weight_bytes(out_dir)
  bf16 = quant_export.bf16_bytes(cfg)
  stats = Q.error_stats(params, qparams, cfg)
  out: dict[str, Any] = {
      "size": {"bytes": size, "bf16_bytes": bf16, "ratio_vs_bf16": size / bf16},
      "param_bytes": {"quantized": Q.param_bytes(qparams), "float32": Q.param_bytes(params)},
      "error_summary": quant_export.summarize(stats), "tensors": stats}
  if job.ppl_file is not None:
    ids = scoring.file_tokens(tok, job.ppl_file)
    before = _ppl(params, cfg, ids, job, mesh, tok)
    after = _ppl(qparams, cfg, ids, job, mesh, tok)
    out["perplexity"] = {"file": os.path.abspath(job.ppl_file), "before": before["ppl"],
                         "after": after["ppl"], "increase": after["ppl"] - before["ppl"],
                         "tokens": after["tokens"], "windows": after["windows"]}
  return out


def _ppl(params, cfg, ids, job: QuantizeJob, mesh, tok) -> dict:
  res = scoring.perplexity(params, cfg, ids, seq_len=job.seq_len, max_windows=job.max_windows,
                           batch_size=1, progress=job.progress, mesh=mesh,
                           bos_id=scoring.bos_prefix(tok))
  return {k: res[k] for k in ("ppl", "nll", "tokens", "windows")}


def _windows(ids, seq_len: int, n: int) -> list[np.ndarray]:
  ids = np.asarray(ids, np.int32)
  n = min(n, len(ids) // seq_len)
  return [ids[k * seq_len:(k + 1) * seq_len][None] for k in range(n)]


def quantize_checkpoint(model_dir: str, output_dir: str, format_name: str, *,
                        calib_data: str | None = None, calib_samples: int | None = None,
                        calib_seq_len: int | None = None, mesh: str = "", **settings) -> dict:
  """`quantize.run.run` of a `QuantizeJob` given as keywords: `settings` are its fields, the
  calibration spec's as `calib_data`, `calib_samples`, `calib_seq_len` (unset: the job's
  defaults), `mesh` a mesh spec string. Returns the report."""
  job = QuantizeJob(model_dir=model_dir, output_dir=output_dir, format=format_name,
                                 mesh=MeshSpec(mesh), **settings)
  given = {"data": calib_data or "", "samples": calib_samples, "seq_len": calib_seq_len}
  calib = dataclasses.replace(job.calib, **{k: v for k, v in given.items() if v is not None})
  return run(dataclasses.replace(job, calib=calib))
