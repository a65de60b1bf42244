"""What every launch script shares: one-line error reporting (`errors.main_wrapper`, under the
name the scripts use) and flag parsing. No library module imports this one."""

from __future__ import annotations

import sys

from minitron_jax.errors import main_wrapper, missing_package_message  # noqa: F401


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
