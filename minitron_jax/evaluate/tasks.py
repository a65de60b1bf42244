"""Zero-shot evaluation tasks, built the way lm-evaluation-harness (v0.4) builds them.

Every example becomes one or more ``Request(context, continuation)`` pairs scored by
log-likelihood. Prompts, target delimiters and tokenization follow the harness task
configs so that accuracies are comparable with published numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


# The repository root (three levels above this file): `../shared/data` beside it is the
# default local data folder.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_LOCAL_ROOT = os.path.normpath(os.path.join(PROJECT_ROOT, "..", "shared", "data"))
DATA_ROOT_ENV = "MINITRON_JAX_DATA_ROOT"


def default_data_root() -> str:
  """`$MINITRON_JAX_DATA_ROOT`, else `../shared/data` beside the project checkout."""
  return os.environ.get(DATA_ROOT_ENV, DEFAULT_LOCAL_ROOT)


@dataclasses.dataclass(frozen=True)
class Request:
  """One log-likelihood query: score ``continuation`` given ``context``."""

  context: str
  continuation: str


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation item: a request per option (one for LAMBADA) and the gold index.

  ``description`` goes before any few-shot examples and the request's context (MMLU's
  subject line); ``group`` is the subject a task averages over (MMLU); ``flagged`` marks an
  item whose gold label a re-annotation found wrong or unclear (MMLU-Redux).
  """

  task: str
  requests: tuple[Request, ...]
  label: int
  description: str = ""
  group: str = ""
  flagged: bool = False


@dataclasses.dataclass(frozen=True)
class HubSource:
  """A split of a Hugging Face hub dataset (``repo`` may also be a local folder laid out alike)."""

  repo: str
  config: str | None
  split: str

  def __str__(self) -> str:
    config = f" config {self.config}" if self.config else ""
    return f"{self.repo}{config} split {self.split}"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """Static facts about a task: its local data files, hub split, metrics and option counts."""

  name: str
  files: tuple[str, ...]
  metrics: tuple[str, ...]
  min_choices: int
  max_choices: int
  hub: HubSource
  # The hub split the harness draws shots from, and whether it leaves the scored item out
  # (it does when the task's YAML names no test split, i.e. scores its validation split).
  train: HubSource | None = None
  shots_exclude_scored: bool = True


_MC = ("acc", "acc_norm")
# Metric lists copy the harness configs: winogrande reports acc only, and
# lambada_openai reports acc (greedy match) and perplexity. The hub splits are the ones
# the harness scores, and the local files hold the same items.
TASK_SPECS: dict[str, TaskSpec] = {
  s.name: s
  for s in (
    TaskSpec("winogrande", ("winogrande/dev.jsonl",), ("acc",), 2, 2,
             HubSource("allenai/winogrande", "winogrande_xl", "validation"),
             HubSource("allenai/winogrande", "winogrande_xl", "train")),
    TaskSpec("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _MC, 2, 2,
             HubSource("baber/piqa", None, "validation"), HubSource("baber/piqa", None, "train")),
    TaskSpec("hellaswag", ("hellaswag/hellaswag_val_full.txt",), _MC, 4, 4,
             HubSource("Rowan/hellaswag", None, "validation"),
             HubSource("Rowan/hellaswag", None, "train")),
    TaskSpec("arc_easy", ("arc/ARC-Easy-Test.gptfathom.jsonl",), _MC, 3, 5,
             HubSource("allenai/ai2_arc", "ARC-Easy", "test"),
             HubSource("allenai/ai2_arc", "ARC-Easy", "train"), False),
    # The original-layout ARC-Challenge file lacks the 22 numeric-key items; this
    # one has all 1172 test items the harness scores, identical on the overlap.
    TaskSpec("arc_challenge", ("arc/ARC-Challenge-Test.gptfathom.jsonl",), _MC, 3, 5,
             HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
             HubSource("allenai/ai2_arc", "ARC-Challenge", "train"), False),
    TaskSpec("openbookqa", ("openbookqa/test.tsv",), _MC, 4, 4,
             HubSource("allenai/openbookqa", "main", "test"),
             HubSource("allenai/openbookqa", "main", "train"), False),
    TaskSpec("lambada", ("lambada/lambada_openai_test.jsonl",), ("acc", "ppl"), 1, 1,
             HubSource("EleutherAI/lambada_openai", "default", "test")),
    # Locally MMLU-Redux (5,686 re-annotated MMLU test questions); on the hub all of MMLU.
    TaskSpec("mmlu", ("mmlu-redux/mmlu_redux.jsonl",), ("acc",), 4, 4,
             HubSource("cais/mmlu", "all", "test")),
  )
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)

_RECORD_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def _malformed(path: Path, lineno: int, why: str) -> ValueError:
  return ValueError(f"{path}: line {lineno}: {why}")


def _read_lines(path: Path) -> list[str]:
  if not path.is_file():
    raise FileNotFoundError(f"task data file not found: {path}")
  # split("\n") rather than splitlines(): U+2028 and friends may sit inside JSON strings.
  lines = path.read_text(encoding="utf-8").split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
  for lineno, line in enumerate(_read_lines(path), start=1):
    if not line.strip():
      continue
    try:
      yield lineno, json.loads(line)
    except json.JSONDecodeError as err:
      raise _malformed(path, lineno, f"invalid JSON ({err.msg})") from None


def _build_all(path: Path, records, build: Callable[[Any], Example]) -> list[Example]:
  out = []
  for lineno, record in records:
    try:
      out.append(build(record))
    except _RECORD_ERRORS as err:
      raise _malformed(path, lineno, f"{type(err).__name__}: {err}") from None
  return out


def _jsonl(build: Callable[[dict], Example]) -> Callable[[Sequence[Path]], list[Example]]:
  return lambda paths: _build_all(paths[0], _json_records(paths[0]), build)


def _index(value: Any, n: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
    raise ValueError(f"answer {value!r} is not an index into {n} choices")
  return value


def _mc(task: str, context: str, choices: Sequence[str], label: int) -> Example:
  # The harness joins context and choice with its default target delimiter " ".
  requests = tuple(Request(context, " " + choice) for choice in choices)
  return Example(task, requests, _index(label, len(requests)))


def _winogrande(rec: dict) -> Example:
  # Partial evaluation: the option goes into the context, and the shared
  # remainder of the sentence is the continuation that gets scored.
  sentence = rec["sentence"]
  idx = sentence.index("_")
  continuation = " " + sentence[idx + 1 :].strip()
  requests = tuple(Request(sentence[:idx] + rec[k], continuation) for k in ("option1", "option2"))
  return Example("winogrande", requests, {"1": 0, "2": 1}[rec["answer"]])


def _load_piqa(paths: Sequence[Path]) -> list[Example]:
  data_path, label_path = paths
  labels = []
  for lineno, line in enumerate(_read_lines(label_path), start=1):
    if line.strip() not in ("0", "1"):
      raise _malformed(label_path, lineno, f"label {line!r} is not 0 or 1")
    labels.append(int(line))
  records = list(_json_records(data_path))
  if len(records) != len(labels):
    raise ValueError(f"{data_path} has {len(records)} items but {label_path} has {len(labels)} labels")
  return _build_all(data_path, [(n, (rec, lab)) for (n, rec), lab in zip(records, labels)], _piqa)


def _piqa(item: tuple[dict, int]) -> Example:
  rec, label = item
  return _mc("piqa", f"Question: {rec['goal']}\nAnswer:", [rec["sol1"], rec["sol2"]], label)


def hellaswag_preprocess(text: str) -> str:
  """The harness's HellaSwag cleanup: turn WikiHow markup into plain sentences."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


# Last sentence end inside the context; what follows it is the ActivityNet ``ctx_b``.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def _hellaswag_query(line: str) -> str:
  """Turn a stored ``activity_label: ctx`` line into the harness query.

  The file was cleaned with a fixed list of tags ([header], [step], [substeps],
  [title]) and stores the raw ``ctx``, whereas the harness builds
  ``ctx_a + " " + ctx_b.capitalize()`` and then deletes every ``[...]`` span.
  ``ctx_b`` is the lower-case fragment after the last sentence end, so that
  fragment is capitalized; the full cleanup is rerun only where brackets are left,
  because rerunning it elsewhere would also collapse double spaces the harness keeps.
  """
  label, sep, ctx = line.partition(": ")
  if not sep or not ctx:
    raise ValueError("context line is not 'activity: context'")
  if ctx[-1] not in ".!?":
    ends = list(_SENTENCE_END.finditer(ctx))
    start = ends[-1].end() if ends else 0
    if ctx[start : start + 1].islower():
      ctx = ctx[:start] + ctx[start:].capitalize()
  query = f"{label}: {ctx}"
  return hellaswag_preprocess(query) if "[" in query else query


def _hellaswag(block: tuple[str, int, list[str]]) -> Example:
  ctx, gold, endings = block
  # Endings were cleaned like the context; only leftover brackets need the full cleanup.
  endings = [hellaswag_preprocess(e) if "[" in e else e for e in endings]
  return _mc("hellaswag", _hellaswag_query(ctx), endings, gold)


def _load_hellaswag(paths: Sequence[Path]) -> list[Example]:
  path = paths[0]
  lines = _read_lines(path)
  if len(lines) % 6:
    raise _malformed(path, len(lines), f"{len(lines)} lines is not a whole number of 6-line items")
  blocks = []
  for start in range(0, len(lines), 6):
    ctx, gold, *endings = lines[start : start + 6]
    if not gold.strip().isdigit():
      raise _malformed(path, start + 2, f"gold index {gold!r} is not an integer")
    blocks.append((start + 1, (ctx, int(gold), endings)))
  return _build_all(path, blocks, _hellaswag)


def _arc_builder(task: str) -> Callable[[dict], Example]:
  def build(rec: dict) -> Example:
    question = rec["question"]
    if isinstance(question, dict):
      # Original ARC layout; keys are letters or digits, matched verbatim as the
      # harness does with choices.label.index(answerKey).
      keys = [c["label"] for c in question["choices"]]
      texts = [c["text"] for c in question["choices"]]
      return _mc(task, f"Question: {question['stem']}\nAnswer:", texts, keys.index(rec["answerKey"]))
    return _mc(task, f"Question: {question}\nAnswer:", list(rec["choices"]), rec["answer"])

  return build


_OBQA_LABEL = re.compile(r"\(([A-Z])\) ")
_OBQA_COLUMNS = ("Question Stem", "Choices", "Answer Key")


def _openbookqa_choices(packed: str) -> tuple[list[str], list[str]]:
  """Split ``"(A) x (B) y ..."`` into labels and texts, insisting on A, B, C, ... order."""
  parts = _OBQA_LABEL.split(packed)
  keys, texts = parts[1::2], [t.strip() for t in parts[2::2]]
  if parts[0].strip() or len(keys) < 2 or "".join(keys) != "ABCDEFGH"[: len(keys)]:
    raise ValueError(f"choices {packed!r} are not '(A) ... (B) ...'")
  return keys, texts


def _openbookqa_example(stem: str, keys: Sequence[str], texts: Sequence[str],
                        answer: str) -> Example:
  # Harness: choices.label.index(answerKey.lstrip()).
  return _mc("openbookqa", stem, texts, list(keys).index(answer.lstrip()))


def _openbookqa(row: dict) -> Example:
  keys, texts = _openbookqa_choices(row["Choices"])
  return _openbookqa_example(row["Question Stem"], keys, texts, row["Answer Key"])


def _load_openbookqa(paths: Sequence[Path]) -> list[Example]:
  path = paths[0]
  lines = _read_lines(path)
  header = lines[0].split("\t") if lines else []
  missing = [c for c in _OBQA_COLUMNS if c not in header]
  if missing:
    raise _malformed(path, 1, f"header lacks columns {missing}")
  rows = []
  # Plain tab splitting: csv quoting rules would misread stray quote marks.
  for lineno, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      raise _malformed(path, lineno, f"{len(fields)} tab-separated fields, expected {len(header)}")
    rows.append((lineno, dict(zip(header, fields))))
  return _build_all(path, rows, _openbookqa)


def _lambada(rec: dict) -> Example:
  # Harness: context = text.split(" ")[:-1] joined, target = " " + last word.
  context, sep, word = rec["text"].rpartition(" ")
  if not sep or not word:
    raise ValueError("text has no final space-separated word")
  return Example("lambada", (Request(context, " " + word),), 0)


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_example(subject: str, question: str, choices: Sequence[str], answer: int,
                 flagged: bool = False) -> Example:
  """lm-evaluation-harness's MMLU prompt: a subject line, the question, lettered options and
  "Answer:", scored on the continuations " A" .. " D"."""
  if len(choices) != 4:
    raise ValueError(f"{len(choices)} choices, MMLU has 4")
  lines = [question.strip()] + [f"{k}. {c}" for k, c in zip(MMLU_LETTERS, choices)]
  context = "\n".join(lines) + "\nAnswer:"
  description = (f"The following are multiple choice questions (with answers) about "
                 f"{subject.replace('_', ' ')}.\n\n")
  return Example("mmlu", tuple(Request(context, " " + k) for k in MMLU_LETTERS),
                 _index(answer, 4), description, subject, flagged)


def _mmlu(rec: dict) -> Example:
  # MMLU-Redux's error_type: "ok" (any case) confirms the original label.
  return mmlu_example(rec["subject"], rec["question"], rec["choices"], rec["answer"],
                      str(rec["error_type"]).lower() != "ok")


def _hub_mmlu(row: dict) -> Example:
  return mmlu_example(row["subject"], row["question"], row["choices"], row["answer"])


_LOADERS: dict[str, Callable[[Sequence[Path]], list[Example]]] = {
  "winogrande": _jsonl(_winogrande),
  "piqa": _load_piqa,
  "hellaswag": _load_hellaswag,
  "arc_easy": _jsonl(_arc_builder("arc_easy")),
  "arc_challenge": _jsonl(_arc_builder("arc_challenge")),
  "openbookqa": _load_openbookqa,
  "lambada": _jsonl(_lambada),
  "mmlu": _jsonl(_mmlu),
}


def load_task(name: str, data_root: str | os.PathLike, limit: int | None = None) -> list[Example]:
  """Load a task's examples in file order.

  Args:
    name: One of ``TASKS``.
    data_root: Folder holding the per-task data folders (``piqa/``, ``arc/``, ...).
    limit: Keep only the first ``limit`` examples.

  Returns:
    The task's examples.

  Raises:
    ValueError: Unknown task, negative limit, or a malformed line (file and line named).
    FileNotFoundError: A data file is missing (path named).
  """
  if name not in TASK_SPECS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  paths = [Path(data_root) / rel for rel in TASK_SPECS[name].files]
  examples = _LOADERS[name](paths)
  return examples if limit is None else examples[:limit]


# Hub rows use the columns of the datasets the harness reads; each maps onto the local
# record format (or the same example builder) so that a task has one prompt construction.


def _hub_piqa(row: dict) -> Example:
  return _piqa((row, row["label"]))


def _hub_hellaswag(row: dict) -> Example:
  # The harness's process_docs, which ``_hellaswag_query`` reconstructs for the local file:
  # the hub keeps ctx_a and ctx_b apart and the WikiHow markup uncleaned.
  ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}"
  query = hellaswag_preprocess(f"{row['activity_label']}: {ctx}")
  endings = [hellaswag_preprocess(e) for e in row["endings"]]
  return _mc("hellaswag", query, endings, int(row["label"]))


def _hub_arc(task: str) -> Callable[[dict], Example]:
  build = _arc_builder(task)

  def from_row(row: dict) -> Example:
    keys, texts = row["choices"]["label"], row["choices"]["text"]
    choices = [{"label": k, "text": t} for k, t in zip(keys, texts)]
    return build({"question": {"stem": row["question"], "choices": choices},
                  "answerKey": row["answerKey"]})

  return from_row


def _hub_openbookqa(row: dict) -> Example:
  choices = row["choices"]
  return _openbookqa_example(row["question_stem"], choices["label"], choices["text"],
                             row["answerKey"])


_HUB_BUILDERS: dict[str, Callable[[dict], Example]] = {
  "winogrande": _winogrande,
  "piqa": _hub_piqa,
  "hellaswag": _hub_hellaswag,
  "arc_easy": _hub_arc("arc_easy"),
  "arc_challenge": _hub_arc("arc_challenge"),
  "openbookqa": _hub_openbookqa,
  "lambada": _lambada,
  "mmlu": _hub_mmlu,
}


def examples_from_rows(name: str, rows: Iterable[dict], where: str) -> list[Example]:
  """Build a task's examples from rows of its hub dataset (``TASK_SPECS[name].hub``).

  Args:
    name: One of ``TASKS``.
    rows: The split's rows as dicts, in order.
    where: How to name the source in errors (e.g. the repo, config and split).

  Returns:
    The examples, equal to those ``load_task`` builds from a local copy of the same items.

  Raises:
    ValueError: Unknown task, or a row that does not fit the task (row index named).
  """
  if name not in _HUB_BUILDERS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  out = []
  for i, row in enumerate(rows):
    try:
      out.append(_HUB_BUILDERS[name](row))
    except _RECORD_ERRORS as err:
      raise ValueError(f"{where}: row {i}: {type(err).__name__}: {err}") from None
  return out


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation token ids, split exactly as the harness's HFLM does.

  Trailing spaces of the context move onto the continuation; the pair is encoded
  whole and the continuation is whatever follows the context's own encoding, so a
  merge across the boundary is attributed to the continuation. An empty context
  becomes the BOS token (EOS if there is none).
  """
  if context == "":
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
      raise ValueError("empty context needs a tokenizer with a BOS or EOS token")
    return [prefix], _encode(tokenizer, continuation)
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = _encode(tokenizer, context + continuation)
  context_ids = _encode(tokenizer, context)
  return context_ids, whole[len(context_ids) :]


def tokenize_requests(examples: Sequence[Example], tokenizer: Any) -> list[list[tuple[list[int], list[int]]]]:
  """``encode_pair`` for every request, nested per example."""
  return [[encode_pair(tokenizer, r.context, r.continuation) for r in ex.requests] for ex in examples]


def choice_length(request: Request) -> int:
  """Characters of the answer choice, the divisor the harness uses for ``acc_norm``.

  The harness divides by ``len(choice)``, which excludes the leading target delimiter.
  """
  return len(request.continuation.removeprefix(" "))
