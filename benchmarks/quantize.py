"""Every quantization format and method against the float model, measured side by side in one run.

  python benchmarks/quantize.py --model_dir=smollm2-135m --windows=64 --methods=rtn,gptq

For each format × method (rtn: round to nearest; gptq, awq, awq_gptq: calibrated on
--calib_data, WikiText-2 valid by default, never the test text): WikiText-2 test perplexity and its increase, the mean
per-token KL(float ‖ quantized) of the next-token distributions over the same windows (steady
where a perplexity difference is noise), the mean relative RMS weight error, calibration time,
size on disk of the export (vs a bfloat16 export written here too), bytes of the JAX param
pytree, and optionally JAX KV-cache decode tokens/s (vs the float32 params).

With --qad_steps, every calibrated (non-GGUF) model is also trained by quantization-aware
distillation from its own frozen grid (teacher: the float model; `quantize/qad.FrozenGrid`) on
--calib_data, and measured beside it as `<method>+qad` (its "calib s" column: the training):

  python benchmarks/quantize.py --pairs=int4_asym:awq_gptq --qad_steps=32
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "HF directory or known model name.")
_DATA = flags.DEFINE_string("data_root", None, "Data folder (default: ../shared/data).")
_WINDOWS = flags.DEFINE_integer("windows", 64, "Evaluation windows of --seq_len tokens.",
                                lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 512, "Evaluation window length.", lower_bound=2)
_DECODE = flags.DEFINE_integer("decode_tokens", 0, "Tokens generated per decode timing (0: no "
                               "decode timing).", lower_bound=0)
_BATCH = flags.DEFINE_integer("decode_batch", 1, "Prompts decoded together.", lower_bound=1)
_FORMATS = flags.DEFINE_list("formats", None, "Export formats to measure (default: all).")
_METHODS = flags.DEFINE_list("methods", ["rtn", "gptq"], "Methods (rtn, gptq, awq, awq_gptq; "
                             "each where it applies).")
_GPTQ_FORMATS = flags.DEFINE_list("gptq_formats", None, "Formats also run with the calibrated "
                                  "methods (default: every format each supports).")
_PAIRS = flags.DEFINE_list("pairs", None, "Explicit format:method pairs (e.g. int4:awq_gptq) "
                           "instead of --formats x --methods.")
_CALIB = flags.DEFINE_string("calib_data", None, "GPTQ calibration data (default: "
                             "<data_root>/wikitext-2/valid.txt).")
_NCAL = flags.DEFINE_integer("calib_samples", 32, "GPTQ calibration sequences.", lower_bound=1)
_LCAL = flags.DEFINE_integer("calib_seq_len", 512, "GPTQ calibration sequence length.",
                             lower_bound=2)
_QAD_STEPS = flags.DEFINE_integer("qad_steps", 0, "QAD updates from each calibrated model's "
                                  "frozen grid (0: no QAD rows).", lower_bound=0)
_QAD_BATCH = flags.DEFINE_integer("qad_batch", 8, "QAD sequences per update.", lower_bound=1)
_QAD_SEQ = flags.DEFINE_integer("qad_seq_len", 256, "QAD sequence length.", lower_bound=2)
_QAD_LR = flags.DEFINE_float("qad_lr", 3e-5, "QAD peak learning rate (cosine to a tenth).")

HEADER = ["format", "method", "ppl", "Δppl", "KL nats/tok", "weight rel err", "calib s",
          "disk MB", "disk/bf16", "param MB", "mem/f32", "decode tok/s", "speed/f32"]


def _table(rows) -> str:
  widths = [max(len(r[i]) for r in [HEADER] + rows) for i in range(len(HEADER))]
  lines = ["| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |"
           for r in [HEADER] + rows]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def _qad(params, cfg, quantized, tok, source: str, work: str):
  """(the QAD-trained model on the frozen grids of `quantized`, seconds)."""
  import time

  from minitron_jax.data import corpus
  from minitron_jax import sharding
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.losses import DistillConfig
  from minitron_jax.distill.step import TrainConfig
  from minitron_jax.quantize import qad

  t0 = time.perf_counter()
  grid = qad.FrozenGrid(quantized, cfg)
  tcfg = TrainConfig(mode="distill", steps=_QAD_STEPS.value, global_batch_size=_QAD_BATCH.value,
                     seq_len=_QAD_SEQ.value, lr=_QAD_LR.value, min_lr=_QAD_LR.value / 10,
                     warmup_steps=min(2, _QAD_STEPS.value - 1), dtype="float32", save_every=0,
                     async_checkpointing=False, log_every=max(1, _QAD_STEPS.value // 8))
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  result = trainer.fit(tcfg, model_params=grid.start_params(), model_cfg=cfg,
                       train_tokens=corpus.load_tokens(source, tok), output_dir=work,
                       teacher_params=params, teacher_cfg=cfg, dcfg=DistillConfig(),
                       pad_id=int(pad or 0), student_transform=grid.transform())
  return grid.encode(sharding.host_params(result.params)), time.perf_counter() - t0


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from minitron_jax import model as M
  from minitron_jax.data import corpus, packing
  from minitron_jax.evaluate import generate, tasks
  from minitron_jax.io import files
  from minitron_jax.io import hf as hf_io
  from minitron_jax.quantize import calibrate
  from minitron_jax.quantize import export
  from minitron_jax.quantize import formats as Q

  names = _FORMATS.value or list(export.EXPORT_FORMATS)
  pairs = [(n, m) for n in names for m in _METHODS.value]
  if _PAIRS.value:
    pairs = [tuple(p.split(":", 1)) if ":" in p else (p, "") for p in _PAIRS.value]
  for n, m in pairs:  # names and methods known (pairs: and fitting) before any work
    fmt = export.export_format(n)
    calibrate.check_method(m, fmt if _PAIRS.value else Q.QuantFormat.INT4_GROUP)
  root = _DATA.value or tasks.default_data_root()
  params, cfg, tok, path = hf_io.load_model(_MODEL.value, "float32")
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  with open(os.path.join(root, "wikitext-2", "test.txt"), encoding="utf-8") as f:
    ids = tok(f.read(), add_special_tokens=False)["input_ids"]
  prompt = ids[:16]
  windows = packing.eval_windows(np.asarray(ids, np.int32), _SEQ.value)[:_WINDOWS.value]
  calib_src = _CALIB.value or os.path.join(root, "wikitext-2", "valid.txt")
  batches = list(packing.calibration_batches(corpus.load_tokens(calib_src, tok),
                                             num_samples=_NCAL.value, seq_len=_LCAL.value,
                                             batch_size=8))

  @jax.jit
  def logp(p, tokens_bt):
    return jax.nn.log_softmax(M.forward(p, cfg, tokens_bt)["logits"][:, :-1])

  @jax.jit
  def scores(logq, logp, tokens_bt):  # (sum of next-token NLL, sum of KL(float || quantized))
    nll = -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1).sum()
    return nll, jnp.sum(jnp.exp(logq) * (logq - logp))

  def decode(p):
    if not _DECODE.value:
      return float("nan")
    return generate.decode_speed(p, cfg, [prompt] * _BATCH.value, _DECODE.value, 2)

  # Quantize and export every model first, then score them all on each window, so the float
  # reference runs once per window.
  models = [("float32", "-", params, 0.0, None)]
  with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
    hf_io.save_hf(params, cfg, os.path.join(tmp, "bf16"), dtype=jnp.bfloat16)
    bf16 = files.weight_bytes(os.path.join(tmp, "bf16"))
    for name, method in pairs:
      fmt = export.export_format(name)
      if not calibrate.applies(method, fmt) or (
          method != "rtn" and _GPTQ_FORMATS.value and name not in _GPTQ_FORMATS.value):
        continue
      calibrated = method in calibrate.CALIBRATED
      raw, secs = calibrate.quantize_with_method(params, cfg, fmt, method,
                                                 batches if calibrated else None,
                                                 progress=True)
      qp = export.export_params(raw, cfg, fmt)
      try:
        size = files.weight_bytes(export.export(qp, cfg, fmt, os.path.join(tmp, f"{name}-{method}"),
                                                source_dir=path))
      except ValueError:  # refused for this model (consumers cannot load it)
        size = None
      models.append((name, method, qp, secs, size))
      print(f"{name} {method}: quantized in {secs:.0f}s", file=sys.stderr, flush=True)
      if _QAD_STEPS.value and calibrated and not fmt.is_gguf:
        qq, secs = _qad(params, cfg, raw, tok, calib_src, os.path.join(tmp, f"qad-{name}"))
        models.append((name, f"{method}+qad", export.export_params(qq, cfg, fmt), secs, size))
        print(f"{name} {method}+qad: {_QAD_STEPS.value} steps in {secs:.0f}s", file=sys.stderr,
              flush=True)
  mem0, rate0 = Q.param_bytes(params), decode(params)
  extra = [(Q.param_bytes(m[2]), decode(m[2]),
            export.summarize(Q.error_stats(params, m[2], cfg))["mean_rel_rms_error"])
           for m in models]
  nll, kl = np.zeros(len(models)), np.zeros(len(models))

  def table(done):
    n = done * (_SEQ.value - 1)
    base = float(np.exp(nll[0] / n))
    rows = []
    for (name, method, _, secs, size), (mem, rate, err), a, b in zip(models, extra, nll, kl):
      ppl = float(np.exp(a / n))
      disk = ["refused", "-"] if size is None and name != "float32" else \
          [f"{(size or bf16) / 1e6:.1f}", f"{(size or bf16) / bf16:.3f}"]
      rows.append([name, method, f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f} %",
                   f"{b / n:.5f}", f"{err:.4f}", f"{secs:.1f}", *disk, f"{mem / 1e6:.1f}",
                   f"{mem / mem0:.3f}", f"{rate:.1f}", f"{rate / rate0:.2f}"])
    return _table(rows)

  for k, w in enumerate(windows):
    tokens = jnp.asarray(w[None])
    ref = logp(params, tokens)
    for i, m in enumerate(models):
      a, b = scores(ref, ref if i == 0 else logp(m[2], tokens), tokens)
      nll[i], kl[i] = nll[i] + float(a), kl[i] + float(b)
    if (k + 1) % 8 == 0 and k + 1 < len(windows):
      print(f"after {k + 1} windows:\n{table(k + 1)}", file=sys.stderr, flush=True)
  print(f"{path}: {len(windows)} x {_SEQ.value}-token WikiText-2 test windows "
        f"({len(windows) * (_SEQ.value - 1)} predicted tokens); calibrated on {_NCAL.value} x "
        f"{_LCAL.value} tokens of {os.path.basename(calib_src)}; {jax.devices()[0].platform}")
  print(table(len(windows)))


if __name__ == "__main__":
  app.run(main)
