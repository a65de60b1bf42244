"""Quantize an HF Llama checkpoint and export it for transformers / vLLM / llama.cpp.

  python launch/quantize.py --model_dir=smollm2-135m --output_dir=out/smollm2-int8 --format=int8
  python launch/quantize.py --output_dir=out/smollm2-int4 --format=int4 --method=gptq \
      --calib_data=shakespeare --calib_samples=128 --calib_seq_len=512

Formats: fp8 (transformers fine-grained FP8, 128x128 blocks), fp8_channel, fp8_tensor, int8,
int4, int4_asym (compressed-tensors), gguf_q8_0, gguf_q4_0 (llama.cpp). The output directory gets
the checkpoint, the tokenizer files and quantize_report.json (size, per-tensor errors,
perplexity before/after, method, calibration data and time).

--method=gptq (every format, FP8 included) rounds each decoder-layer weight with GPTQ on
Hessians of --calib_data, layer by layer; --method=awq (int4, int4_asym, gguf_q4_0) folds
activation-aware per-channel scales into the RMSNorm / up / v weights and clips each group's
range, then rounds to nearest (awq_gptq: with GPTQ, the default for those formats when
--calib_data is given). Round to nearest (rtn) is the default when no calibration data is
given.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, settings, sharding  # noqa: E402
from minitron_jax.data.calib import CalibSpec  # noqa: E402
from minitron_jax.evaluate import tasks  # noqa: E402
from minitron_jax.quantize import export as quant_export  # noqa: E402
from minitron_jax.quantize import run as quantize_run  # noqa: E402

JOB = quantize_run.QuantizeJob  # every flag's default is the job's

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m",
                             "HF model directory, a known short name, or a hub id.")
_OUT = flags.DEFINE_string("output_dir", None, "Directory to write (atomically).")
# A plain string, so an unknown format gets the one-line error of every other bad input.
_FORMAT = flags.DEFINE_string("format", None, f"One of {', '.join(quant_export.EXPORT_FORMATS)}.")
_OVERWRITE = flags.DEFINE_bool("overwrite", JOB.overwrite, "Replace a non-empty output directory.")
_DATA = flags.DEFINE_string("data_root", None, "Folder of evaluation data (default: "
                            "../shared/data beside the project, or $MINITRON_JAX_DATA_ROOT).")
_PPL = flags.DEFINE_string("ppl_file", JOB.ppl_file, "Text for perplexity before/after "
                           "(default: <data_root>/wikitext-2/test.txt; 'none' skips it).")
_SEQ = flags.DEFINE_integer("seq_len", JOB.seq_len, "Perplexity window length.")
_WIN = flags.DEFINE_integer("max_windows", JOB.max_windows, "Perplexity windows.")
_GROUP = flags.DEFINE_integer("group_size", JOB.group_size, "INT4 group size.")
_EMB = flags.DEFINE_bool("include_embeddings", JOB.include_embeddings,
                         "Quantize the embedding / LM head too (GGUF formats only).")
_CALIB = flags.DEFINE_string("calibration_file", JOB.calibration_file,
                             "Text for static FP8 activation scales (fp8 only).")
_CALIB_WIN = flags.DEFINE_integer("calibration_windows", JOB.calibration_windows,
                                  "Calibration windows.")
_DENSE = flags.DEFINE_enum("unquantized_dtype", JOB.unquantized_dtype,
                           list(quant_export.DENSE_DTYPES),
                           "dtype of the tensors left unquantized (HF formats).")
_PRE = flags.DEFINE_string("gguf_tokenizer_pre", JOB.gguf_tokenizer_pre,
                           "llama.cpp pre-tokenizer name for GGUF (e.g. llama-bpe, smollm); "
                           "empty: the one recorded at GGUF import, else detected.")
_MESH = flags.DEFINE_string("mesh", JOB.mesh.spec, "Device mesh to shard params and batch rows "
                            "over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as "
                            "launch/distill.py); empty: one device.")

# Plain strings, checked by the library with the other inputs (one-line errors).
_METHOD = flags.DEFINE_string("method", JOB.method, "rtn, gptq, awq or awq_gptq (default when "
                              "--calib_data is given: awq_gptq for int4, int4_asym and "
                              "gguf_q4_0, gptq for the other formats; else rtn).")
_CDATA = flags.DEFINE_string("calib_data", JOB.calib.data or None, "GPTQ / AWQ calibration "
                             "data: a file, directory, glob, jsonl, hub name or 'shakespeare' "
                             "(as for pruning).")
_NCAL = flags.DEFINE_integer("calib_samples", JOB.calib.samples,
                             "Calibration sequences (gptq, awq).")
_LCAL = flags.DEFINE_integer("calib_seq_len", JOB.calib.seq_len,
                             "Tokens per calibration sequence.")
_DAMP = flags.DEFINE_float("gptq_damp", JOB.gptq_damp, "GPTQ dampening (fraction of the mean "
                           "Hessian diagonal).")
_ORDER = flags.DEFINE_bool("act_order", JOB.act_order, "GPTQ: quantize columns by decreasing "
                           "Hessian diagonal.")

FLAG_NAMES = settings.flag_names({"calib.data": "--calib_data", "calib.samples": "--calib_samples",
                                  "calib.seq_len": "--calib_seq_len"})


def job_from_flags() -> quantize_run.QuantizeJob:
  if not _OUT.value or not _FORMAT.value:
    raise ValueError("--output_dir and --format are required")
  ppl_file = _PPL.value or os.path.join(_DATA.value or tasks.default_data_root(),
                                        "wikitext-2", "test.txt")
  calib = CalibSpec(data=_CDATA.value or "", samples=_NCAL.value, seq_len=_LCAL.value,
                    batch_size=JOB.calib.batch_size, seed=JOB.calib.seed)
  return JOB(
      model_dir=_MODEL.value, output_dir=_OUT.value, format=_FORMAT.value,
      overwrite=_OVERWRITE.value, ppl_file=None if ppl_file == "none" else ppl_file,
      seq_len=_SEQ.value, max_windows=_WIN.value, group_size=_GROUP.value,
      include_embeddings=_EMB.value, calibration_file=_CALIB.value,
      calibration_windows=_CALIB_WIN.value, unquantized_dtype=_DENSE.value,
      gguf_tokenizer_pre=_PRE.value, method=_METHOD.value, calib=calib,
      gptq_damp=_DAMP.value, act_order=_ORDER.value, mesh=settings.MeshSpec(_MESH.value))


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  with settings.named(FLAG_NAMES):
    report = quantize_run.run(job_from_flags())
  print(quant_export.format_report(report))


if __name__ == "__main__":
  app.run(main)
