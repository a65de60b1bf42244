"""What every launch script shares: one-line error reporting and flag parsing. No library module
imports this one."""

from __future__ import annotations

import sys
from typing import Any, Callable

from minitron_jax.config import ConfigError

# Errors that are the user's input, reported as one line rather than a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               ConfigError, PermissionError)

# Packages that only some commands need, with how to get them.
OPTIONAL_PACKAGES = {
    "torch": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
             "(only the tests need it)",
    "compressed_tensors": "pip install compressed-tensors",
    "accelerate": "pip install accelerate",
}


def missing_package_message(e: ModuleNotFoundError) -> str | None:
  """`error:` text for a third-party package that is not installed; None for our own modules
  (a missing module of ours is a bug, and its traceback should show)."""
  top = (e.name or "").split(".")[0]
  if not top or top == "minitron_jax":
    return None
  how = OPTIONAL_PACKAGES.get(top, f"pip install {top.replace('_', '-')}")
  return f"the Python package {top!r} is not installed; {how}"


def main_wrapper(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Turns input errors, failed downloads and missing packages into `error: <message>` on
  stderr and exit status 1."""

  def wrapped(argv):
    from minitron_jax.data.corpus import DataDownloadError
    from minitron_jax.evaluate.sources import EvalDataError
    from minitron_jax.io.registry import ModelDownloadError

    errors = USER_ERRORS + (ModelDownloadError, DataDownloadError, EvalDataError)
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # keep backend-probing chatter off the console
    try:
      return main(argv)
    except errors as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(1)
    except ModuleNotFoundError as e:
      msg = missing_package_message(e)
      if msg is None:
        raise
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
