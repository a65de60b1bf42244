import os
import shutil

import pytest

from helpers import make_hf_llama


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, real_dir):
  """A random 4-layer Llama with SmolLM2's tokenizer: the recipe end to end in minutes."""
  _, d = make_hf_llama(tmp_path_factory.mktemp("teacher") / "tiny", vocab=49152, hidden=128,
                       inter=256, layers=4, heads=4, kv_heads=2, max_pos=512)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "special_tokens_map.json"):
    if os.path.exists(os.path.join(real_dir, f)):
      shutil.copy(os.path.join(real_dir, f), d)
  return d
