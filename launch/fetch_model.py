"""Materialises a known model as a float32 Hugging Face directory.

Examples:
  python launch/fetch_model.py --model=smollm2-135m
  python launch/fetch_model.py --model=smollm2-135m --output_dir=models/teacher --overwrite
"""

import os
import sys

from absl import app, flags

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitron_jax.io import registry  # noqa: E402

_NAMES = ", ".join(registry.known_names())
_MODEL = flags.DEFINE_string("model", None, f"Known model name, one of: {_NAMES}.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory to write the model to (default: <cache>/models/<model>, "
    "where <cache> is $MINITRON_JAX_CACHE or ~/.cache/minitron_jax).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")

flags.mark_flag_as_required("model")
flags.register_validator("model", lambda name: name is None or name in registry.known_names(),
                         message=f"--model must be one of: {_NAMES}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    out = registry.fetch_model(_MODEL.value, _OUTPUT_DIR.value, overwrite=_OVERWRITE.value)
  except (FileExistsError, registry.ModelDownloadError) as e:
    sys.exit(f"error: {e}")
  print(f"{_MODEL.value} written to {out}")


if __name__ == "__main__":
  app.run(main)
