"""Data preparation and the training loader, beside what they must keep up with.

Prints, on the same text (WikiText-2 test and valid by default, cut into paragraph documents):
- `tokenizers`' own single-threaded batch encode in tokens/s: the per-core ceiling;
- `prepare` tokens/s at `--num_proc=1` and `=2` (reading, tokenizing, writing shards), each
  one's share of the ceiling per process, and the speed-up from 1 to 2 processes;
- the loader's tokens/s for one process (packed `--seq_len` rows of the prepared shards),
  beside the per-host token rate of the 8B -> 4B distillation step on v5p-64 as
  `benchmarks/aot_pod.py`'s roofline puts it (`--pod_step_seconds` for `--pod_rows` rows of
  `--pod_seq_len` tokens on `--pod_chips` chips, `--pod_chips_per_host` per host; the defaults
  are docs/pod-scale.md's figures for the width student).
The machine's load average is printed with the figures: on a shared machine they are lower
bounds.

  python benchmarks/data.py --num_proc=1,2
"""

import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per process: the ceiling
os.environ.setdefault("RAYON_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from minitron_jax import cli  # noqa: E402
from minitron_jax.data import corpus, mixture, pipeline, prepare  # noqa: E402

_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                     "data", "wikitext-2")
_TEXT = flags.DEFINE_list("text", [os.path.join(_ROOT, f) for f in ("test.txt", "valid.txt")],
                          "Text files to tokenize (cut into paragraph documents).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "smollm2-135m", "Model whose tokenizer to use.")
_PROCS = flags.DEFINE_list("num_proc", ["1", "2"], "Process counts to prepare with.")
_REPEAT = flags.DEFINE_integer("repeat", 4, "Copies of the text (a longer run per measurement).")
_SEQ = flags.DEFINE_integer("seq_len", 8192, "Loader row length.")
_ROWS = flags.DEFINE_integer("rows", 8, "Loader rows per batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Loader batches timed.")
_WORKERS = flags.DEFINE_list("loader_workers", ["0"], "Loader worker-process counts to time.")
_STEP_S = flags.DEFINE_float("pod_step_seconds", 39.9, "Seconds per 8B->4B update (roofline).")
_POD_ROWS = flags.DEFINE_integer("pod_rows", 1152, "Rows per 8B->4B update.")
_POD_SEQ = flags.DEFINE_integer("pod_seq_len", 8192, "Tokens per row of the 8B->4B update.")
_CHIPS = flags.DEFINE_integer("pod_chips", 32, "Chips of the slice (v5p-64: 32).")
_PER_HOST = flags.DEFINE_integer("pod_chips_per_host", 4, "Chips per host (v5p: 4).")


def documents() -> list[str]:
  docs = []
  for path in _TEXT.value:
    with open(path, encoding="utf-8") as f:
      docs += mixture.split_documents(f.read(), 4000)
  return docs * _REPEAT.value


def ceiling(tok, docs: list[str]) -> tuple[float, int]:
  """(tokens/s, tokens) of `tokenizers`' batch encode in this process, one thread."""
  backend = tok.backend_tokenizer
  t0 = time.perf_counter()
  n = sum(len(e.ids) for e in backend.encode_batch(docs, add_special_tokens=False))
  return n / (time.perf_counter() - t0), n


def prepare_rate(tok, src: str, out: str, num_proc: int) -> tuple[float, int]:
  t0 = time.perf_counter()
  m = corpus.prepare(prepare.PrepareSpec(src, docs_per_shard=512, num_proc=num_proc), out, tok)
  return m["tokens"] / (time.perf_counter() - t0), m["tokens"]


def loader_rate(tok, out: str, workers: int = 0) -> float:
  docs = corpus.open_documents(out, tok)
  with pipeline.Loader([docs], seq_len=_SEQ.value, global_batch_size=_ROWS.value,
                       num_workers=workers) as loader:
    next(loader)  # the first batch builds the iterator (and starts the workers)
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
      next(loader)
    return _BATCHES.value * _ROWS.value * _SEQ.value / (time.perf_counter() - t0)


@cli.main_wrapper
def main(argv: list[str]) -> None:
  del argv
  from minitron_jax.io import hf as hf_io, registry

  tok = hf_io.load_tokenizer(str(registry.resolve_model_dir(_TOKENIZER.value)))
  docs = documents()
  work = tempfile.mkdtemp(prefix="minitron-data-bench-")
  try:
    src = os.path.join(work, "text.jsonl")
    with open(src, "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    print(f"{len(docs)} documents; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    top, n = ceiling(tok, docs)
    print(f"tokenizers batch encode, 1 thread: {top:,.0f} tokens/s ({n:,} tokens)")
    rates = {}
    for p in map(int, _PROCS.value):
      rates[p], _ = prepare_rate(tok, src, os.path.join(work, f"p{p}"), p)
      print(f"prepare --num_proc={p}: {rates[p]:,.0f} tokens/s = {rates[p] / p / top:.0%} of "
            f"the ceiling per process")
    if 1 in rates and 2 in rates:
      print(f"speed-up 1 -> 2 processes: {rates[2] / rates[1]:.2f}x")
    per_host = _POD_ROWS.value * _POD_SEQ.value / _STEP_S.value / _CHIPS.value * _PER_HOST.value
    for w in map(int, _WORKERS.value):
      got = loader_rate(tok, os.path.join(work, f"p{min(rates)}"), w)
      print(f"loader, 1 process, {w} workers: {got:,.0f} tokens/s; the 8B->4B step needs "
            f"{per_host / _PER_HOST.value:,.0f} tokens/s per chip, {per_host:,.0f} per host: "
            f"{got / per_host:.1f}x")
    print(f"load average afterwards {os.getloadavg()[0]:.1f}")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
