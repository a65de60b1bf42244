"""Sparsity methods side by side: WikiText-2 test perplexity one-shot and after masked KD.

  python benchmarks/sparsity.py --runs=magnitude:2:4,wanda:2:4,sparsegpt:2:4 --kd_steps=40

Each run is `method:pattern` (pattern `2:4`, `4:8`, ... or `unstructured`, at --sparsity).
Wanda and SparseGPT calibrate on --calib_data (WikiText-2 valid by default, never the test
text). With --kd_steps, every run listed in --kd_runs (default: all) is also distilled from
the dense model with its zeros held fixed (`TrainConfig.keep_sparsity`) on the calibration
text, and measured again. One line per result is printed as soon as it exists, then a table.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "HF directory or known model name.")
_DATA = flags.DEFINE_string("data_root", None, "Data folder (default: ../shared/data).")
_WINDOWS = flags.DEFINE_integer("windows", 64, "Evaluation windows of --seq_len tokens.",
                                lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 512, "Evaluation window length.", lower_bound=2)
_RUNS = flags.DEFINE_list("runs", ["magnitude:2:4", "wanda:2:4", "sparsegpt:2:4",
                                   "magnitude:unstructured", "wanda:unstructured",
                                   "sparsegpt:unstructured"], "method:pattern runs.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Zero fraction of unstructured runs.")
_CALIB = flags.DEFINE_string("calib_data", None, "Calibration and KD text (default: "
                             "<data_root>/wikitext-2/valid.txt).")
_NCAL = flags.DEFINE_integer("calib_samples", 64, "Calibration sequences.", lower_bound=1)
_LCAL = flags.DEFINE_integer("calib_seq_len", 512, "Calibration sequence length.",
                             lower_bound=2)
_KD_STEPS = flags.DEFINE_integer("kd_steps", 0, "Masked KD updates per run (0: none).",
                                 lower_bound=0)
_KD_RUNS = flags.DEFINE_list("kd_runs", None, "Runs also distilled (default: all).")
_KD_BATCH = flags.DEFINE_integer("kd_batch", 8, "KD sequences per update.", lower_bound=1)
_KD_SEQ = flags.DEFINE_integer("kd_seq_len", 256, "KD sequence length.", lower_bound=2)
_KD_LR = flags.DEFINE_float("kd_lr", 1e-4, "KD peak learning rate (cosine to a tenth).")
_ONESHOT = flags.DEFINE_bool("oneshot_eval", True, "Measure each run one-shot too (off: only "
                              "after masked KD, when another command measured one-shot).")
_DENSE_PPL = flags.DEFINE_float("dense_ppl", None, "The dense model's perplexity measured "
                                "before on the same windows (skips measuring it again).")


def _kd(params, cfg, sparse, tok, source: str, work: str):
  """(the sparse model after masked KD from the dense `params`, seconds)."""
  from minitron_jax import sharding
  from minitron_jax.data import corpus
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.losses import DistillConfig
  from minitron_jax.distill.step import TrainConfig

  t0 = time.perf_counter()
  steps = _KD_STEPS.value
  tcfg = TrainConfig(mode="distill", steps=steps, global_batch_size=_KD_BATCH.value,
                     seq_len=_KD_SEQ.value, lr=_KD_LR.value, min_lr=_KD_LR.value / 10,
                     warmup_steps=min(2, steps - 1), dtype="float32", save_every=0,
                     async_checkpointing=False, log_every=max(1, steps // 4),
                     keep_sparsity=True)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  result = trainer.fit(tcfg, model_params=sparse, model_cfg=cfg,
                       train_tokens=corpus.load_tokens(source, tok), output_dir=work,
                       teacher_params=params, teacher_cfg=cfg, dcfg=DistillConfig(),
                       pad_id=int(pad or 0), log=lambda s: print(s, file=sys.stderr,
                                                                 flush=True))
  return sharding.host_params(result.params), time.perf_counter() - t0


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from minitron_jax.data import corpus, packing
  from minitron_jax.evaluate import scoring, tasks
  from minitron_jax.io import hf as hf_io
  from minitron_jax.sparsify import apply
  from minitron_jax.sparsify.methods import METHODS, Pattern

  runs = []
  for r in _RUNS.value:
    method, pattern = r.split(":", 1)
    if method not in METHODS:
      raise ValueError(f"unknown method in {r!r}; known: {METHODS}")
    runs.append((r, method, Pattern.parse("" if pattern == "unstructured" else pattern,
                                          _SPARSITY.value)))
  kd_runs = set(_KD_RUNS.value or _RUNS.value) if _KD_STEPS.value else set()
  root = _DATA.value or tasks.default_data_root()
  params, cfg, tok, _ = hf_io.load_model(_MODEL.value, "float32")
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  ids = scoring.file_tokens(tok, os.path.join(root, "wikitext-2", "test.txt"))
  bos = scoring.bos_prefix(tok)  # Gemma's windows start with BOS, as the evaluator's do
  calib_src = _CALIB.value or os.path.join(root, "wikitext-2", "valid.txt")
  batches = list(packing.calibration_batches(corpus.load_tokens(calib_src, tok),
                                             num_samples=_NCAL.value, seq_len=_LCAL.value,
                                             batch_size=8))

  def ppl(p):
    return scoring.perplexity(p, cfg, ids, seq_len=_SEQ.value, max_windows=_WINDOWS.value,
                              batch_size=4, progress=False, bos_id=bos)

  dense = {"ppl": _DENSE_PPL.value, "tokens": "as before"} if _DENSE_PPL.value else ppl(params)
  print(f"dense: ppl {dense['ppl']:.3f} ({dense['tokens']} tokens)", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, method, pattern in runs:
      t0 = time.perf_counter()
      sparse = apply.sparsify_params(params, cfg, method, pattern, batches)
      secs = time.perf_counter() - t0
      if _ONESHOT.value or name not in kd_runs:
        got = ppl(sparse)["ppl"]
        rows.append((method, pattern.name, "one-shot", got, secs))
        print(f"{method} {pattern.name} one-shot: ppl {got:.3f} (+{got - dense['ppl']:.3f}), "
              f"{secs:.0f}s", flush=True)
      if name in kd_runs:
        trained, secs = _kd(params, cfg, sparse, tok, calib_src, os.path.join(tmp, name))
        apply.sparsity_stats(trained, cfg, pattern)  # raises if a group lost its zeros
        got = ppl(trained)["ppl"]
        rows.append((method, pattern.name, f"+ masked KD {_KD_STEPS.value} steps", got, secs))
        print(f"{method} {pattern.name} + masked KD: ppl {got:.3f} "
              f"(+{got - dense['ppl']:.3f}), {secs:.0f}s", flush=True)
  print(f"\n| method | pattern | | WikiText-2 ppl | increase | seconds |\n|---|---|---|---|---|---|"
        f"\n| dense | | | {dense['ppl']:.3f} | | |")
  for method, pat, what, got, secs in rows:
    print(f"| {method} | {pat} | {what} | {got:.3f} | +{got - dense['ppl']:.3f} | {secs:.0f} |")


if __name__ == "__main__":
  app.run(main)
