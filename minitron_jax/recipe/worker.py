"""Entry point of one recipe stage in its own process (the recipe starts it; see
`stages.run_isolated`):

  python -m minitron_jax.recipe.worker RUN_DIR STAGE

Errors are reported as the launch scripts report them (`errors.main_wrapper`): one `error:`
line and exit status 1."""

import sys

from minitron_jax import errors
from minitron_jax.recipe import stages


@errors.main_wrapper
def main(argv):
  if len(argv) != 3:
    raise ValueError("usage: python -m minitron_jax.recipe.worker RUN_DIR STAGE")
  stages.run_stage(argv[1], argv[2])


if __name__ == "__main__":
  main(sys.argv)
