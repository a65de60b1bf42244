"""Generate text from an HF Llama checkpoint with a KV cache.

  python launch/generate.py --model_dir=smollm2-135m --chat --prompt="What is gravity?"
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli, sharding  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.evaluate import generate  # noqa: E402

_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m",
                             "HF model directory, a known short name, or a hub id.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["The capital of France is"],
                                    "Prompt; repeat the flag for a batch.")
_MAX = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.", lower_bound=1)
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.", lower_bound=1e-6, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MESH = flags.DEFINE_string("mesh", "", "Device mesh to shard params and batch rows over, e.g. fsdp:-1 or data:2,fsdp:2,tensor:2 (as launch/distill.py); empty: one device.")


@cli.main_wrapper
def main(argv):
  del argv
  sharding.initialize_distributed()
  params, cfg, tok, _ = hf_io.load_model(_MODEL.value, _DTYPE.value)
  prompts = [generate.encode_prompt(tok, p, chat=_CHAT.value) for p in _PROMPT.value]
  sampling = generate.SamplingConfig(max_new_tokens=_MAX.value, temperature=_TEMP.value,
                                     top_p=_TOP_P.value, seed=_SEED.value)
  result = generate.generate(params, cfg, prompts, sampling,
                             eos_ids=generate.eos_ids(cfg, tok),
                             mesh=sharding.stage_mesh(_MESH.value))
  for prompt, new in zip(_PROMPT.value, result.tokens):
    print(f"### {prompt}\n{tok.decode(new, skip_special_tokens=True)}\n")
  print(f"prefill {result.prefill_seconds:.2f}s, decode {result.decode_steps} steps at "
        f"{result.decode_tokens_per_second:.1f} tokens/s (batch {len(prompts)})",
        file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
