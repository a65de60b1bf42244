"""Every quantization format against the float model, measured side by side in one run.

  python benchmarks/quantize.py --model_dir=smollm2-135m --windows=8

For each format: WikiText-2 perplexity (and its increase), the mean per-token KL divergence
from the float model's next-token distribution (first two windows; steadier than a perplexity
difference), size on disk of the export (vs a
bfloat16 export written here too), bytes of the JAX param pytree and JAX KV-cache decode
tokens/s (vs the float32 params), printed as one table of ratios.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "HF directory or known model name.")
_DATA = flags.DEFINE_string("data_root", None, "Data folder (default: ../shared/data).")
_WINDOWS = flags.DEFINE_integer("windows", 8, "Perplexity windows of --seq_len tokens.",
                                lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 512, "Perplexity window length.", lower_bound=2)
_DECODE = flags.DEFINE_integer("decode_tokens", 64, "Tokens generated per decode timing.",
                               lower_bound=2)
_BATCH = flags.DEFINE_integer("decode_batch", 1, "Prompts decoded together.", lower_bound=1)
_FORMATS = flags.DEFINE_list("formats", None, "Export formats to measure (default: all).")


def _row(name, ppl, base, kl, size, bf16, mem, mem0, rate, rate0):
  return [name, f"{ppl:.3f}", f"{ppl - base:+.3f}", f"{ppl / base:.4f}", f"{kl:.5f}",
          f"{size / 1e6:.1f}",
          f"{size / bf16:.3f}", f"{mem / 1e6:.1f}", f"{mem / mem0:.3f}", f"{rate:.1f}",
          f"{rate / rate0:.2f}"]


def _table(rows) -> str:
  header = ["format", "ppl", "Δppl", "ppl ratio", "KL", "disk MB", "disk/bf16", "param MB",
            "mem/f32", "decode tok/s", "speed/f32"]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from minitron_jax.evaluate import tasks
  from minitron_jax.evaluate import generate, scoring as evaluate
  from minitron_jax.io import hf as hf_io
  from minitron_jax import model as M
  from minitron_jax.quantize import export as E
  from minitron_jax.quantize import formats as Q

  names = _FORMATS.value or list(E.EXPORT_FORMATS)
  for n in names:
    E.export_format(n)
  text = os.path.join(_DATA.value or tasks.default_data_root(), "wikitext-2", "test.txt")
  params, cfg, tok, path = hf_io.load_model(_MODEL.value, "float32")
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  with open(text, encoding="utf-8") as f:
    ids = tok(f.read(), add_special_tokens=False)["input_ids"]
  prompt = ids[:16]

  windows = jnp.asarray(np.asarray(ids[:2 * _SEQ.value], np.int32).reshape(2, _SEQ.value))
  logp = jax.jit(lambda p: jax.nn.log_softmax(M.forward(p, cfg, windows)["logits"]))

  def kl(p, ref):  # mean KL(float || quantized) per token over the first two windows
    return float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - logp(p)), axis=-1)))

  def ppl(p):
    return evaluate.perplexity(p, cfg, ids, seq_len=_SEQ.value, max_windows=_WINDOWS.value,
                               batch_size=1, progress=False)["ppl"]

  with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
    hf_io.save_hf(params, cfg, os.path.join(tmp, "bf16"), dtype=jnp.bfloat16)
    bf16 = E.model_bytes(os.path.join(tmp, "bf16"))
    base, mem0, ref = ppl(params), Q.param_bytes(params), logp(params)
    rate0 = generate.decode_speed(params, cfg, [prompt] * _BATCH.value, _DECODE.value, 2)
    rows = [_row("float32", base, base, 0.0, bf16, bf16, mem0, mem0, rate0, rate0)]  # disk: bf16
    for name in names:
      t0 = time.perf_counter()
      fmt = E.export_format(name)
      qp = E.export_params(Q.quantize_params(params, cfg, fmt), cfg, fmt)
      out = E.export(qp, cfg, fmt, os.path.join(tmp, name), source_dir=path)
      rate = generate.decode_speed(qp, cfg, [prompt] * _BATCH.value, _DECODE.value, 2)
      rows.append(_row(name, ppl(qp), base, kl(qp, ref), E.model_bytes(out), bf16,
                       Q.param_bytes(qp), mem0, rate, rate0))
      print(f"{name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
  print(f"{path}: {_WINDOWS.value} x {_SEQ.value}-token WikiText-2 windows, decode "
        f"{_DECODE.value} tokens (batch {_BATCH.value}), {jax.devices()[0].platform}")
  print(_table(rows))


if __name__ == "__main__":
  app.run(main)
