"""Sparsify an HF Llama checkpoint (2:4, N:M or unstructured) and export it.

  python launch/sparsify.py --model_dir=smollm2-135m --output_dir=out/smollm2-24 \
      --method=sparsegpt --pattern=2:4 --calib_data=shakespeare --calib_samples=64
  python launch/sparsify.py --output_dir=out/smollm2-50 --method=magnitude --sparsity=0.5

Methods: magnitude (no data), wanda and sparsegpt (calibrated on --calib_data, layer by
layer). Exports: dense (an ordinary HF checkpoint with zeros), sparse24 (compressed-tensors
sparse-24-bitmask), sparse24_fp8 / sparse24_int8 (the same with 8-bit per-channel weights).
The output directory gets sparsify_report.json (sparsity per matrix, perplexity before/after).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, settings  # noqa: E402
from minitron_jax.data.calib import CalibSpec  # noqa: E402
from minitron_jax.evaluate import tasks  # noqa: E402
from minitron_jax.sparsify import export as sparse_export  # noqa: E402
from minitron_jax.sparsify import run as sparsify_run  # noqa: E402

JOB = sparsify_run.SparsifyJob  # every flag's default is the job's

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m",
                             "HF model directory, a known short name, or a hub id.")
_OUT = flags.DEFINE_string("output_dir", None, "Directory to write (atomically).")
# Plain strings, checked by the library with the other inputs (one-line errors).
_METHOD = flags.DEFINE_string("method", JOB.method, "magnitude, wanda or sparsegpt.")
_PATTERN = flags.DEFINE_string("pattern", JOB.pattern, "N:M (2:4, 4:8, ...: at most N "
                               "non-zeros in every M consecutive inputs) or 'unstructured'.")
_SPARSITY = flags.DEFINE_float("sparsity", JOB.sparsity, "Fraction of zeros of "
                               "--pattern=unstructured (given alone: unstructured).")
_EXPORT = flags.DEFINE_string("export", JOB.export,
                              f"One of {', '.join(sparse_export.EXPORT_FORMATS)}.")
_OVERWRITE = flags.DEFINE_bool("overwrite", JOB.overwrite, "Replace a non-empty output directory.")
_CDATA = flags.DEFINE_string("calib_data", JOB.calib.data or None, "Calibration data of wanda "
                             "and sparsegpt: a file, directory, glob, jsonl, hub name or "
                             "'shakespeare' (as for pruning).")
_NCAL = flags.DEFINE_integer("calib_samples", JOB.calib.samples, "Calibration sequences.")
_LCAL = flags.DEFINE_integer("calib_seq_len", JOB.calib.seq_len,
                             "Tokens per calibration sequence.")
_DAMP = flags.DEFINE_float("damp", JOB.damp, "SparseGPT dampening (fraction of the mean "
                           "Hessian diagonal).")
_BLOCK = flags.DEFINE_integer("block_size", JOB.block_size, "SparseGPT columns per block.")
_DENSE = flags.DEFINE_enum("dense_dtype", JOB.dense_dtype, ["bfloat16", "float16", "float32"],
                           "dtype of the exported float tensors.")
_DATA = flags.DEFINE_string("data_root", None, "Folder of evaluation data (default: "
                            "../shared/data beside the project, or $MINITRON_JAX_DATA_ROOT).")
_PPL = flags.DEFINE_string("ppl_file", JOB.ppl_file, "Text for perplexity before/after "
                           "(default: <data_root>/wikitext-2/test.txt; 'none' skips it).")
_SEQ = flags.DEFINE_integer("seq_len", JOB.seq_len, "Perplexity window length.")
_WIN = flags.DEFINE_integer("max_windows", JOB.max_windows, "Perplexity windows.")
_MESH = flags.DEFINE_string("mesh", JOB.mesh.spec, "Device mesh of the perplexity passes, e.g. "
                            "fsdp:-1; empty: one device.")

FLAG_NAMES = settings.flag_names({"calib.data": "--calib_data", "calib.samples": "--calib_samples",
                                  "calib.seq_len": "--calib_seq_len"})


def job_from_flags() -> sparsify_run.SparsifyJob:
  if not _OUT.value:
    raise ValueError("--output_dir is required")
  ppl_file = _PPL.value or os.path.join(_DATA.value or tasks.default_data_root(),
                                        "wikitext-2", "test.txt")
  calib = CalibSpec(data=_CDATA.value or "", samples=_NCAL.value, seq_len=_LCAL.value,
                    batch_size=JOB.calib.batch_size, seed=JOB.calib.seed)
  # --sparsity alone asks for unstructured sparsity.
  pattern = ("unstructured" if flags.FLAGS["sparsity"].present
             and not flags.FLAGS["pattern"].present else _PATTERN.value)
  return JOB(model_dir=_MODEL.value, output_dir=_OUT.value, method=_METHOD.value,
             pattern=pattern, sparsity=_SPARSITY.value, export=_EXPORT.value,
             overwrite=_OVERWRITE.value, calib=calib, damp=_DAMP.value,
             block_size=_BLOCK.value, dense_dtype=_DENSE.value,
             ppl_file=None if ppl_file == "none" else ppl_file, seq_len=_SEQ.value,
             max_windows=_WIN.value, mesh=settings.MeshSpec(_MESH.value))


@cli.main_wrapper
def main(argv):
  del argv
  with settings.named(FLAG_NAMES):
    report = sparsify_run.run(job_from_flags())
  print(sparsify_run.format_report(report))


if __name__ == "__main__":
  app.run(main)
