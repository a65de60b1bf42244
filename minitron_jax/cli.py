"""What every launch script shares: model resolution, loading, error reporting, JSON output."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable

from minitron_jax.config import ConfigError

# Errors that are the user's input, reported as one line rather than a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               ConfigError, PermissionError)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_root() -> str:
  """`$MINITRON_JAX_DATA_ROOT`, else `../shared/data` beside the project checkout."""
  return os.environ.get("MINITRON_JAX_DATA_ROOT",
                        os.path.normpath(os.path.join(PROJECT_ROOT, "..", "shared", "data")))


def main_wrapper(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Turns input errors into `error: <message>` on stderr and exit status 1."""

  def wrapped(argv):
    from minitron_jax.data import DataDownloadError
    from minitron_jax.registry import ModelDownloadError

    errors = USER_ERRORS + (ModelDownloadError, DataDownloadError)
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # keep backend-probing chatter off the console
    try:
      return main(argv)
    except errors as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(1)

  return wrapped


def flags_parser(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override errors (an unknown `--config.key`, a value of
  the wrong type) reported as one line instead of a traceback."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip("\"'")
    print(f"error: bad config override: {msg} (unknown key or wrong type)", file=sys.stderr)
  sys.exit(1)


def load_model(model_dir: str, dtype: str = "float32", with_tokenizer: bool = True):
  """Resolves a directory, short name or hub id and loads (params, cfg, tokenizer, path)."""
  from minitron_jax import hf_io, registry

  path = str(registry.resolve_model_dir(model_dir))
  params, cfg = hf_io.load_hf(path, dtype=dtype)
  tok = load_tokenizer(path) if with_tokenizer else None
  return params, cfg, tok, path


def load_tokenizer(model_dir: str):
  import transformers

  if not any(os.path.isfile(os.path.join(model_dir, f))
             for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json)")
  return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), so a reader never sees half a file."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
