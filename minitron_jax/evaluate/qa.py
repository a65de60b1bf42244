"""Closed-book question answering: greedy generation scored by exact match, as
lm-evaluation-harness (v0.4.13) scores its ``triviaqa`` and ``nq_open`` tasks.

Everything copies the harness's task YAMLs and the filters and metric they name:

- prompt: ``description`` (nq_open: "Answer these questions:\\n\\n"), then k shots, each its
  question in the task's template, the target delimiter " ", its first answer alias and the
  few-shot delimiter ("\\n\\n"; nq_open "\\n"), then the scored question in the template;
- shots: drawn from the train split by one ``random.Random(1234)`` per task, ``k + 1`` per
  scored item in order, any row equal to the scored row dropped, the first k kept (the harness
  compares the few-shot split with the test split, and both tasks have no test split);
- generation: greedy, at most ``max_gen_toks`` (256) new tokens, cut at the first of "\\n", ".",
  "," and the tokenizer's EOS text; the context keeps its last ``max_len - max_gen_toks``
  tokens, encoded with the tokenizer's default special tokens as the harness's backends do;
- filters ``remove_whitespace`` (strip) and ``take_first``;
- metric ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (nq_open also drops
  articles by regex) against every answer alias; an item counts when any alias matches.

The data comes from the hub only (no local copy): ``mandarjoshi/trivia_qa`` config
``rc.nocontext`` and ``google-research-datasets/nq_open``, their validation split scored. A
``HubSource.repo`` may be a local folder laid out as the hub repository is.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from minitron_jax.evaluate import fewshot
from minitron_jax.evaluate.tasks import HubSource

UNTIL = ("\n", ".", ",")
MAX_GEN_TOKS = 256  # the harness backends' default (the YAMLs set none)
TARGET_DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class QASpec:
  """A closed-book QA task as its harness YAML defines it."""

  name: str
  scored: HubSource
  train: HubSource
  template: str  # doc_to_text, "{question}" filled in
  answers: Callable[[dict], list]  # doc_to_target: every accepted answer, first = shot target
  description: str = ""
  fewshot_delimiter: str = "\n\n"
  regexes_to_ignore: tuple[str, ...] = ()

  def source(self, split: str) -> HubSource:
    return self.train if split == "train" else self.scored


_TRIVIAQA = HubSource("mandarjoshi/trivia_qa", "rc.nocontext", "validation")
_NQ_OPEN = HubSource("google-research-datasets/nq_open", None, "validation")
QA_SPECS: dict[str, QASpec] = {
  "triviaqa": QASpec("triviaqa", _TRIVIAQA, dataclasses.replace(_TRIVIAQA, split="train"),
                     "Question: {question}?\nAnswer:", lambda row: row["answer"]["aliases"]),
  "nq_open": QASpec("nq_open", _NQ_OPEN, dataclasses.replace(_NQ_OPEN, split="train"),
                    "Q: {question}?\nA:", lambda row: row["answer"],
                    description="Answer these questions:\n\n", fewshot_delimiter="\n",
                    regexes_to_ignore=(r"\b(?:The |the |An |A |The |a |an )",)),
}
QA_TASKS: tuple[str, ...] = tuple(QA_SPECS)


@dataclasses.dataclass(frozen=True)
class QAItem:
  """One question with every answer the metric accepts, and the prompt it is asked with."""

  question: str
  answers: tuple[str, ...]
  prompt: str = ""


def spec(name: str) -> QASpec:
  if name not in QA_SPECS:
    raise ValueError(f"unknown QA task {name!r}; known: {', '.join(QA_TASKS)}")
  return QA_SPECS[name]


def parse_qa_task(text: str) -> tuple[str, int | None]:
  """``"triviaqa"`` or ``"triviaqa:200"`` (the first 200 questions) -> (name, cap or None)."""
  name, _, cap = text.strip().partition(":")
  spec(name)
  if cap and (not cap.isdigit() or int(cap) < 1):
    raise ValueError(f"{text!r}: the item cap after ':' must be a positive integer")
  return name, int(cap) if cap else None


def item(task: QASpec, row: dict) -> QAItem:
  answers = task.answers(row)
  answers = [answers] if isinstance(answers, str) else list(answers)
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"answers {answers!r} are not a non-empty list of strings")
  return QAItem(str(row["question"]), tuple(answers))


def render_shot(task: QASpec, shot: QAItem) -> str:
  return (task.template.format(question=shot.question) + TARGET_DELIMITER + shot.answers[0]
          + task.fewshot_delimiter)


def prompt(task: QASpec, question: str, shots: Sequence[QAItem] = ()) -> str:
  """The harness's context: description, shots, then the question (no trailing delimiter)."""
  return (task.description + "".join(render_shot(task, s) for s in shots)
          + task.template.format(question=question))


def build_items(name: str, rows: Sequence[dict], k: int = 0, pool: Sequence[dict] | None = None,
                where: str = "") -> list[QAItem]:
  """Items with their prompts from the scored rows, shots from `pool` (the train split)."""
  task = spec(name)

  def one(rows_, i, label):
    try:
      return item(task, rows_[i])
    except (KeyError, TypeError, ValueError) as err:
      raise ValueError(f"{label}: row {i}: {type(err).__name__}: {err}") from None

  scored = [one(rows, i, where or name) for i in range(len(rows))]
  if k == 0:
    return [dataclasses.replace(q, prompt=prompt(task, q.question)) for q in scored]
  if pool is None:
    raise ValueError(f"{name}: {k} shots need the train split")
  picks = fewshot.split_shot_indices(len(pool), [rows[i] for i in range(len(rows))],
                                     lambda j: pool[j], k)
  return [dataclasses.replace(q, prompt=prompt(task, q.question,
                                               [one(pool, j, f"{name} train") for j in js]))
          for q, js in zip(scored, picks)]


# ------------------------------------------------------------------------------ scoring


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop sequence."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def exact_match(prediction: str, answers: Sequence[str], regexes_to_ignore: Sequence[str] = ()
                ) -> bool:
  """The harness's ``exact_match`` (ignore_case, ignore_punctuation, `regexes_to_ignore`) of a
  stripped prediction against every answer: true when any matches."""
  preds = [prediction.strip()] * len(answers)
  refs = list(answers)
  for pattern in regexes_to_ignore:
    preds = [re.sub(pattern, "", x) for x in preds]
    refs = [re.sub(pattern, "", x) for x in refs]
  preds_a, refs_a = np.char.lower(np.asarray(preds)), np.char.lower(np.asarray(refs))
  table = string.punctuation.maketrans("", "", string.punctuation)
  preds_a = np.char.translate(preds_a, table=table)
  refs_a = np.char.translate(refs_a, table=table)
  return bool(np.any(preds_a == refs_a))


def encode_context(tokenizer, text: str, keep: int) -> list[int]:
  """Context ids as the harness's backends encode them: default special tokens (none when the
  text already starts with BOS), the last `keep` tokens kept; the BOS (else EOS) id if empty."""
  bos = tokenizer.bos_token
  extra = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
  ids = list(tokenizer.encode(text, **extra))[-keep:]
  if ids:
    return ids
  prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else \
      tokenizer.eos_token_id
  return [prefix]


def generate_answers(params, cfg, tokenizer, prompts: Sequence[str], *, batch_size: int = 16,
                     max_len: int | None = None, max_gen_toks: int = MAX_GEN_TOKS, mesh=None,
                     progress: Callable[[int], None] | None = None) -> list[str]:
  """Greedy KV-cache answers to `prompts`, cut at the task's stop strings (and EOS text)."""
  from minitron_jax.evaluate import generate

  max_len = int(max_len or cfg.max_position_embeddings)
  if max_gen_toks >= max_len:
    raise ValueError(f"max_gen_toks={max_gen_toks} must be below max_len={max_len}")
  eos_text = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
  until = list(UNTIL) + ([eos_text] if eos_text not in UNTIL else [])
  sampling = generate.SamplingConfig(max_new_tokens=max_gen_toks)
  eos = generate.eos_ids(cfg, tokenizer)
  out = []
  for start in range(0, len(prompts), batch_size):
    batch = [encode_context(tokenizer, p, max_len - max_gen_toks)
             for p in prompts[start: start + batch_size]]
    result = generate.generate(params, cfg, batch, sampling, eos_ids=eos, mesh=mesh)
    out += [cut_at_stop(tokenizer.decode(t), until) for t in result.tokens]
    if progress is not None:
      progress(len(out))
  return out


# --------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def _hub(source: HubSource):
  from minitron_jax.evaluate import sources

  print(f"minitron_jax: QA: loading {source} from the Hugging Face hub", file=sys.stderr,
        flush=True)
  return sources.load_hub(source)


def load_rows(name: str, split: str):
  """A QA task's hub split (`scored` or `train`); raises `sources.EvalDataError` naming it."""
  from minitron_jax.evaluate import sources

  source = spec(name).source(split)
  try:
    return _hub(source)
  except Exception as err:  # offline, DNS, unknown repository or split
    raise sources.EvalDataError(
        f"QA task {name!r}: the Hugging Face hub failed ({source}: "
        f"{' '.join(str(err).split())[:300]}); it has no local copy: allow hub access "
        f"or run once online to fill the datasets cache") from err


def load_items(name: str, limit: int | None = None, num_fewshot: int = 0) -> list[QAItem]:
  """The first `limit` questions of a QA task's scored split with their k-shot prompts."""
  rows = load_rows(name, "scored")
  if limit is not None:
    rows = rows.select(range(min(limit, len(rows))))
  pool = load_rows(name, "train") if num_fewshot else None
  return build_items(name, rows, num_fewshot, pool, str(spec(name).scored))


def check_data(name: str, probe=None) -> list[str]:
  """What is missing to evaluate QA task `name`, without loading it (`sources.hub_problem`
  or a stand-in as `probe`); the train split lives in the same repository."""
  from minitron_jax.evaluate import sources

  probe = probe or sources.hub_problem
  source = spec(name).scored
  why = probe(source)
  return [] if why is None else [
      f"QA task {name!r}: the Hugging Face hub dataset cannot be loaded ({source}: {why}); it "
      f"has no local copy: allow hub access, or leave the QA task out (--qa_task, "
      f"--config.eval.qa_task)"]


def evaluate_qa(params, cfg, tokenizer, name: str, *, limit: int | None = None,
                num_fewshot: int = 0, batch_size: int = 16, max_len: int | None = None,
                max_gen_toks: int = MAX_GEN_TOKS, mesh=None, progress: bool = True) -> dict:
  """Exact match of greedy answers on a QA task: {"exact_match", its stderr, "examples",
  "num_fewshot", "source", "seconds", "predictions" (the first 20)}."""
  from minitron_jax.evaluate import stats
  from minitron_jax.progress import Progress

  items = load_items(name, limit, num_fewshot)
  if not items:
    raise ValueError(f"QA task {name!r}: no questions to score")
  t0 = time.perf_counter()
  bar = Progress(name, len(items), "questions", progress)
  preds = generate_answers(params, cfg, tokenizer, [q.prompt for q in items],
                           batch_size=batch_size, max_len=max_len, max_gen_toks=max_gen_toks,
                           mesh=mesh, progress=bar.update)
  regexes = spec(name).regexes_to_ignore
  hits = [exact_match(p, q.answers, regexes) for p, q in zip(preds, items)]
  em = sum(hits) / len(hits)
  return {"exact_match": em, "exact_match_stderr": stats.stderr(em, len(hits)),
          "examples": len(hits), "num_fewshot": num_fewshot, "source": f"hub:{spec(name).scored}",
          "seconds": round(time.perf_counter() - t0, 2),
          "predictions": [{"question": q.question, "prediction": p.strip(), "correct": h}
                          for q, p, h in list(zip(items, preds, hits))[:20]]}
