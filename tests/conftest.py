import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
DATA_ROOT = os.environ.get("MINITRON_JAX_DATA_ROOT", os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def data_root():
  if not os.path.isdir(DATA_ROOT):
    pytest.skip(f"evaluation data not found at {DATA_ROOT} (set MINITRON_JAX_DATA_ROOT)")
  return DATA_ROOT
