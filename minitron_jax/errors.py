"""Which errors are the user's to fix, and how an entry point reports them: one `error:` line
on stderr and exit status 1 instead of a traceback.

The launch scripts (through `cli`) and the recipe's stage worker, which runs each stage in a
process of its own, report errors the same way through `main_wrapper`. A stage marks an error of
its own as the user's by subclassing `UnavailableError`, so this module needs no stage.
"""

from __future__ import annotations

import errno
import sys
from typing import Any, Callable

from minitron_jax.config import ConfigError


class UnavailableError(RuntimeError):
  """Something a run needs (a model, a corpus, evaluation data) cannot be had: not found
  locally and not downloadable (no network, an unknown package, repo or dataset)."""


class DiskFullError(UnavailableError):
  """A write failed for lack of space (or a file-size limit); the message names the file and
  the bytes it needed. The partial output has been removed by the writer."""


NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def no_space(e: BaseException) -> bool:
  """Whether `e` is a write refused for lack of space or a file-size limit."""
  return isinstance(e, OSError) and e.errno in NO_SPACE


# Errors that are the user's input, reported as one line rather than a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               ConfigError, PermissionError, UnavailableError)

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
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # keep backend-probing chatter off the console
    try:
      return main(argv)
    except USER_ERRORS as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else e
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(1)
    except OSError as e:
      if not no_space(e):
        raise
      # A write that no writer of ours wrapped (an orbax checkpoint, a cache): name the file.
      print(f"error: {e.filename or 'a write'}: {e.strerror}; free some space and run the same "
            "command again (finished work is kept)", file=sys.stderr)
      sys.exit(1)
    except ModuleNotFoundError as e:
      msg = missing_package_message(e)
      if msg is None:
        raise
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(1)

  return wrapped
