"""Generation throughput of a teacher and its width- and depth-pruned students: same prompts,
same run, KV cache, batch 1 and 32; prints tokens/s and the speed-up over the teacher.

  python benchmarks/decode.py --teacher=smollm2-135m                 # students derived here
  python benchmarks/decode.py --teacher=T --width_dir=W --depth_dir=D   # or given

Without student directories, the students are pruned in memory to the shapes of the recipe
config (`--config`): throughput depends on the architecture, not on which units were kept.
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from minitron_jax import cli  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.evaluate import generate as G  # noqa: E402
from minitron_jax.prune import importance as I  # noqa: E402
from minitron_jax.prune import slicing  # noqa: E402

_TEACHER = flags.DEFINE_string("teacher", "smollm2-135m", "Teacher model.")
_WIDTH = flags.DEFINE_string("width_dir", None, "Width-pruned student (default: derived).")
_DEPTH = flags.DEFINE_string("depth_dir", None, "Depth-pruned student (default: derived).")
_CONFIG = flags.DEFINE_string("config", os.path.join(ROOT, "configs", "smollm2_135m.py"),
                              "Recipe whose prune targets define the derived students.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per row.", lower_bound=2)
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per point (best kept).", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def _recipe(path):
  spec = importlib.util.spec_from_file_location("recipe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def decode_rate(params, cfg, batch, rng):
  prompts = rng.randint(3, cfg.vocab_size, (batch, _PROMPT.value)).tolist()
  return G.decode_speed(params, cfg, prompts, _NEW.value, _REPEATS.value)


@cli.main_wrapper
def main(argv):
  del argv
  params, cfg, _, _ = hf_io.load_model(_TEACHER.value, _DTYPE.value, with_tokenizer=False)
  models = {"teacher": (params, cfg)}
  recipe = _recipe(_CONFIG.value)
  for name, given, section in (("width", _WIDTH.value, "width"), ("depth", _DEPTH.value, "depth")):
    if given:
      p, c, _, _ = hf_io.load_model(given, _DTYPE.value, with_tokenizer=False)
    else:
      if section not in recipe.prune.kinds:
        continue
      targets = dict(recipe.prune[section])
      t = slicing.Targets.from_flags(cfg, **targets)
      plan = slicing.make_plan(cfg, t, I.magnitude_scores(params, cfg),
                               layer_scores=np.arange(cfg.num_hidden_layers, dtype=float)[::-1])
      p, c = slicing.prune(params, cfg, plan)
    models[name] = (p, c)
  rng = np.random.RandomState(0)
  rows = []
  for b in map(int, _BATCHES.value):
    rates = {name: decode_rate(p, c, b, rng) for name, (p, c) in models.items()}
    for name, r in rates.items():
      rows.append((name, b, models[name][1].num_params(), r, r / rates["teacher"]))
  print(f"\n{'model':<8} {'batch':>5} {'params':>10} {'tok/s':>9} {'speed-up':>9}")
  for name, b, n, r, s in rows:
    print(f"{name:<8} {b:>5} {n / 1e6:>9.1f}M {r:>9.1f} {s:>8.2f}x")


if __name__ == "__main__":
  app.run(main)
