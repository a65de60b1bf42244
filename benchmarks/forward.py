"""Forward and greedy-decode throughput: our jitted JAX model against transformers' torch
model, same checkpoint, same inputs, same process, side by side.

  python benchmarks/forward.py --model_dir=smollm2-135m --batch=8 --seq_len=512
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from minitron_jax import cli, model as M  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.evaluate import generate as G  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Model directory or short name.")
_BATCH = flags.DEFINE_integer("batch", 8, "Forward batch size.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 512, "Forward sequence length.", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (best is kept).", lower_bound=1)
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8"], "Decode batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Decoded tokens per row.", lower_bound=2)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.", lower_bound=1)


def _load() -> str:
  """1-minute load average: on a shared machine both columns slow down together, so the
  ratios travel better than the absolute rates."""
  return f"{os.getloadavg()[0]:.1f}"


@cli.main_wrapper
def main(argv):
  del argv
  import torch
  import transformers

  params, cfg, _, path = hf_io.load_model(_MODEL.value, "float32", with_tokenizer=False)
  tmodel = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, cfg.vocab_size, (_BATCH.value, _SEQ.value)).astype(np.int32)
  print(f"devices: jax {jax.devices()[0].platform} x{jax.device_count()}, "
        f"torch threads {torch.get_num_threads()}, load average {_load()} on "
        f"{os.cpu_count()} CPUs")

  fwd = jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"])
  t_jax = best_seconds(lambda: fwd(params, tokens).block_until_ready(), _REPEATS.value)
  tt = torch.as_tensor(tokens, dtype=torch.long)

  def torch_fwd():
    with torch.no_grad():
      tmodel(tt, use_cache=False)

  t_torch = best_seconds(torch_fwd, _REPEATS.value)
  n = tokens.size
  rows = [("forward", f"{_BATCH.value}x{_SEQ.value}", n / t_jax, n / t_torch)]

  for b in map(int, _DECODE_BATCHES.value):
    prompts = rng.randint(3, cfg.vocab_size, (b, _PROMPT_LEN.value))
    sampling = G.SamplingConfig(max_new_tokens=_NEW.value)
    G.generate(params, cfg, prompts.tolist(), sampling, stop_at_eos=False)  # compile
    res = min((G.generate(params, cfg, prompts.tolist(), sampling, stop_at_eos=False)
               for _ in range(_REPEATS.value)), key=lambda r: r.decode_seconds)
    ours = res.decode_tokens_per_second
    pt = torch.as_tensor(prompts, dtype=torch.long)

    def torch_decode(k):
      with torch.no_grad():
        tmodel.generate(pt, attention_mask=torch.ones_like(pt), do_sample=False,
                        max_new_tokens=k, min_new_tokens=k, pad_token_id=0)

    # Decode rate without prefill: time k and 1 new tokens, take the difference.
    torch_decode(2)
    t_full = best_seconds(lambda: torch_decode(_NEW.value), _REPEATS.value)
    t_one = best_seconds(lambda: torch_decode(1), _REPEATS.value)
    theirs = b * (_NEW.value - 1) / max(t_full - t_one, 1e-9)
    rows.append(("greedy decode", f"batch {b}", ours, theirs))

  print(f"\nload average at the end: {_load()}")
  print(f"\n{'what':<14} {'shape':<10} {'jax tok/s':>12} {'torch tok/s':>12} {'ratio':>7}")
  for what, shape, a, b in rows:
    print(f"{what:<14} {shape:<10} {a:>12.1f} {b:>12.1f} {a / b:>6.2f}x")


if __name__ == "__main__":
  app.run(main)
