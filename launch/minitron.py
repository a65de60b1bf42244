"""The whole recipe in one command, on a config file from configs/.

  python launch/minitron.py                                   # default: SmolLM2-135M on CPU
  python launch/minitron.py --config=configs/smollm2_135m.py --config.eval.limit=50

Stages, in order: fetch, synthetic_data (when --config.data.source names synthetic), data (the
sources mixed, with a held-out slice), teacher_correction, prune_width, prune_depth,
teacher_logits (one cached top-K pass of the teacher, with --config.distill.teacher_topk),
distill_width, distill_depth, prune_search and distill_search (the architecture search, with
--config.prune.search.enabled=True), baseline_pruned_ce and baseline_random_ce (with
--config.baselines=True), quantize, evaluate, report. Outputs go to --config.run_dir; a
finished stage is skipped on a re-run, and --stages=a,b runs only those.

  python launch/minitron.py --config.data.source=shakespeare
  python launch/minitron.py --config.data.source="('wikitext2','synthetic')" \
      --config.data.weights="(0.7,0.3)"
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from minitron_jax import cli  # noqa: E402
from minitron_jax.recipe import stages as pipeline  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "smollm2_135m.py"), "Recipe config file.",
    lock_config=True)
_STAGES = flags.DEFINE_list("stages", None, "Run only these stages (default: every stage whose "
                            "output is missing).")


@cli.main_wrapper
def main(argv):
  del argv
  pipeline.run(_CONFIG.value, only=tuple(_STAGES.value or ()))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser)
