"""Where evaluation data comes from: a local folder, else the Hugging Face hub.

Each zero-shot task, and the WikiText-2 text for perplexity (``ppl``), is looked up in order:

  1. the folder the user names (``--data_root``, ``config.data_root``), else
     ``$MINITRON_JAX_DATA_ROOT``;
  2. ``../shared/data`` beside the project checkout;
  3. the hub dataset lm-evaluation-harness reads (``TaskSpec.hub``, ``WIKITEXT2``), through
     ``datasets.load_dataset``, which downloads it once into its own cache.

A local folder counts for a task only if it holds all of the task's files. Hub rows become
the same examples as the local files (``tasks.examples_from_rows``). When a task is in no
local folder and the hub fails (offline, no network), ``EvalDataError`` names the task, the
paths and hub split tried, and the flag and variable to set. ``check_eval_data`` answers the
same question up front without loading anything, so a run can refuse before it starts.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from minitron_jax.errors import UnavailableError
from minitron_jax.evaluate import tasks
from minitron_jax.evaluate.tasks import Example, HubSource

DATA_ROOT_ENV = tasks.DATA_ROOT_ENV
PPL = "ppl"
PPL_FILE = "wikitext-2/test.txt"
# Word-level WikiText-2 (with <unk> and @-@), one row per line of the local file.
WIKITEXT2 = HubSource("Salesforce/wikitext", "wikitext-2-v1", "test")


class EvalDataError(UnavailableError):
  """Evaluation data is in no local folder and could not be had from the hub."""


def default_local_root() -> Path:
  """``../shared/data`` beside the project checkout."""
  return Path(tasks.DEFAULT_LOCAL_ROOT)


def local_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
  """The folders to look in, in order: ``data_root`` (else the env variable), then the default."""
  explicit = data_root or os.environ.get(DATA_ROOT_ENV)
  roots = [Path(explicit).expanduser()] if explicit else []
  default = default_local_root()
  return roots if default in roots else roots + [default]


def _files(name: str) -> tuple[str, ...]:
  if name == PPL:
    return (PPL_FILE,)
  if name not in tasks.TASK_SPECS:
    raise ValueError(f"unknown task {name!r}; known: {PPL}, {', '.join(tasks.TASKS)}")
  return tasks.TASK_SPECS[name].files


def hub_source(name: str) -> HubSource:
  """The hub split a task (or ``ppl``) falls back to."""
  _files(name)  # validates the name
  return WIKITEXT2 if name == PPL else tasks.TASK_SPECS[name].hub


def find_local(name: str, data_root: str | os.PathLike | None = None) -> Path | None:
  """The first of ``local_roots(data_root)`` holding all of the task's files, or None."""
  files = _files(name)
  return next((r for r in local_roots(data_root) if all((r / f).is_file() for f in files)), None)


def locate(name: str, data_root: str | os.PathLike | None = None) -> str:
  """Where a task's data will come from, without touching the network.

  Returns:
    ``"local:<folder>"`` or ``"hub:<repo> [config <c>] split <s>"``.
  """
  root = find_local(name, data_root)
  return f"local:{root}" if root is not None else f"hub:{hub_source(name)}"


def _what(name: str) -> str:
  return "perplexity text (WikiText-2)" if name == PPL else f"task {name!r}"


def _one_line(err: BaseException, limit: int = 300) -> str:
  text = " ".join(str(err).split()) or type(err).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _missing(name: str, data_root, source: HubSource, reason: str) -> EvalDataError:
  files = _files(name)
  tried = ", ".join(str(r / files[0]) for r in local_roots(data_root))
  ppl_flag = ", pass --ppl_file" if name == PPL else ""
  return EvalDataError(
      f"{_what(name)}: not found locally (tried {tried}) and the Hugging Face hub failed "
      f"({source}: {reason}). Pass --data_root (--config.data_root in the recipe) or set "
      f"{DATA_ROOT_ENV} to a folder holding {', '.join(files)}{ppl_flag}, or allow hub access.")


def load_hub(source: HubSource):
  """One split of a hub dataset through ``datasets.load_dataset`` (downloaded once, cached).

  ``source.repo`` may also be a local folder laid out as the hub repository is.
  """
  import datasets  # only the hub path needs it

  return datasets.load_dataset(source.repo, source.config, split=source.split)


@functools.lru_cache(maxsize=None)
def _hub_split(name: str, source: HubSource):
  print(f"minitron_jax: {_what(name)}: no local copy, loading {source} from the Hugging Face hub",
        file=sys.stderr, flush=True)
  return load_hub(source)


def _hub_rows(name: str, data_root, source: HubSource):
  try:
    return _hub_split(name, source)
  except Exception as err:  # offline, DNS, unknown repository or split: nothing else to try
    raise _missing(name, data_root, source, _one_line(err)) from err


def load_examples(name: str, data_root: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[Example]:
  """A task's examples from the first local folder holding it, else from the hub.

  Args:
    name: One of ``tasks.TASKS``.
    data_root: The user's data folder, or None for ``$MINITRON_JAX_DATA_ROOT`` / the default.
    limit: Keep only the first ``limit`` examples.

  Raises:
    ValueError: Unknown task, negative limit, a malformed local file or hub row.
    EvalDataError: No local copy, and the hub dataset could not be loaded.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  root = find_local(name, data_root)
  if root is not None:
    return tasks.load_task(name, root, limit=limit)
  source = hub_source(name)
  rows = _hub_rows(name, data_root, source)
  if limit is not None:
    rows = rows.select(range(min(limit, len(rows))))
  return tasks.examples_from_rows(name, rows, str(source))


# MMLU's shots on the hub come from its dev split (5 per subject).
MMLU_DEV = HubSource("cais/mmlu", "all", "dev")


def load_prompted(name: str, data_root: str | os.PathLike | None = None, *,
                  limit: int | None = None, num_fewshot: int = 0,
                  only_ok: bool = False, per_group: int | None = None) -> list[Example]:
  """A task's first `limit` examples with their description and `num_fewshot` shots in the
  contexts (`fewshot.with_shots`; from the hub train split where the task has one and no
  local copy, `hub_train_shots`); `only_ok` keeps the items whose label no re-annotation
  flagged (MMLU-Redux), before shots are chosen; `per_group` scores only the first
  `per_group` items of each subject (shots still come from the whole subject).

  Raises:
    As `load_examples`; ValueError if a task has too few items for the shots.
  """
  from minitron_jax.evaluate import fewshot

  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  train = tasks.TASK_SPECS[name].train if name in tasks.TASK_SPECS else None
  if num_fewshot and train is not None and find_local(name, data_root) is None:
    return hub_train_shots(name, data_root, train, num_fewshot, limit)
  examples = load_examples(name, data_root, limit=None if num_fewshot or per_group else limit)
  if only_ok:
    examples = [ex for ex in examples if not ex.flagged]
  dev = None
  if name == "mmlu" and num_fewshot and find_local(name, data_root) is None:
    dev = tasks.examples_from_rows(name, _hub_rows(name, data_root, MMLU_DEV), str(MMLU_DEV))
  out = fewshot.with_shots(examples, num_fewshot, limit=None if per_group else limit, dev=dev)
  if per_group:
    seen: dict[str, int] = {}
    kept = []
    for ex in out:
      seen[ex.group] = seen.get(ex.group, 0) + 1
      if seen[ex.group] <= per_group:
        kept.append(ex)
    out = kept if limit is None else kept[:limit]
  return out


def hub_train_shots(name: str, data_root, train: HubSource, k: int,
                    limit: int | None) -> list[Example]:
  """The first `limit` hub items of a task with k shots from its hub train split, drawn by
  the harness's rule (`fewshot.split_shot_indices`; rows compared as the harness compares
  documents)."""
  from minitron_jax.evaluate import fewshot

  source = hub_source(name)
  rows = _hub_rows(name, data_root, source)
  if limit is not None:
    rows = rows.select(range(min(limit, len(rows))))
  pool = _hub_rows(name, data_root, train)
  scored = tasks.examples_from_rows(name, rows, str(source))
  picks = fewshot.split_shot_indices(len(pool), list(rows), lambda j: pool[j], k,
                                     tasks.TASK_SPECS[name].shots_exclude_scored)
  return [fewshot.prompted(ex, tasks.examples_from_rows(name, [pool[j] for j in js], str(train)))
          for ex, js in zip(scored, picks)]


def wikitext2_text(rows: Iterable[str]) -> str:
  """The WikiText-2 file from its hub rows: non-blank lines keep their newline, and blank
  lines (a lone space in the file) are empty rows."""
  return "".join(row or " \n" for row in rows)


def load_ppl_text(data_root: str | os.PathLike | None = None) -> tuple[str, str]:
  """The WikiText-2 test text for perplexity and where it came from (a path or ``hub:...``).

  Raises:
    EvalDataError: No local copy, and the hub dataset could not be loaded.
  """
  root = find_local(PPL, data_root)
  if root is not None:
    path = root / PPL_FILE
    return path.read_text(encoding="utf-8"), str(path)
  return wikitext2_text(_hub_rows(PPL, data_root, WIKITEXT2)["text"]), f"hub:{WIKITEXT2}"


# ------------------------------------------------------------------------- up-front checks


def in_datasets_cache(source: HubSource, cache_dir: str | os.PathLike | None = None) -> bool:
  """Whether ``datasets`` has prepared this config before (it then loads it offline)."""
  import datasets
  from datasets.naming import camelcase_to_snakecase

  root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
  *namespace, name = source.repo.split("/")
  dataset_dir = root / "___".join([*namespace, camelcase_to_snakecase(name)])
  # datasets keeps <config>/<version>/<hash>/ per prepared dataset.
  return any(p.is_dir() for p in (dataset_dir / (source.config or "default")).glob("*/*"))


def hub_problem(source: HubSource, timeout: float = 10.0) -> str | None:
  """Why ``source`` cannot be loaded now, or None: a local dataset folder, a dataset in the
  datasets cache, or a repository the hub answers for (one metadata request) all pass."""
  if Path(source.repo).is_dir() or in_datasets_cache(source):
    return None
  import datasets

  if datasets.config.HF_HUB_OFFLINE:
    return "offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and not in the datasets cache"
  from huggingface_hub import HfApi

  try:
    HfApi().dataset_info(source.repo, timeout=timeout)
  except Exception as err:  # no network, DNS, unknown repository
    return _one_line(err)
  return None


def check_eval_data(names: Sequence[str], data_root: str | os.PathLike | None = None, *,
                    ppl_file: str | os.PathLike | None = None,
                    probe: Callable[[HubSource], str | None] = hub_problem) -> list[str]:
  """What is missing to evaluate ``names`` (tasks and ``ppl``); empty when all can load.

  Local folders are checked first; only tasks with no local copy ask ``probe`` about their
  hub dataset (once per repository and config), so a complete local folder costs no network.

  Args:
    names: Task names; ``ppl`` stands for the perplexity text.
    data_root: As for ``load_examples``.
    ppl_file: An explicit perplexity file, which then must exist (no fallback).
    probe: ``hub_problem`` or a stand-in: a source -> None if loadable, else the reason.

  Raises:
    ValueError: An unknown task name.
  """
  problems, probed = [], {}
  for name in names:
    if name == PPL and ppl_file:
      if not os.path.isfile(ppl_file):
        problems.append(f"{_what(name)}: {ppl_file}: no such file (--ppl_file)")
      continue
    if find_local(name, data_root) is not None:
      continue
    source = hub_source(name)
    if source not in probed:
      probed[source] = probe(source)
    if probed[source] is not None:
      problems.append(str(_missing(name, data_root, source, probed[source])))
  return problems


def require_eval_data(names: Sequence[str], data_root: str | os.PathLike | None = None, *,
                      ppl_file: str | os.PathLike | None = None) -> None:
  """``check_eval_data``, raising ``EvalDataError`` with every problem (one a line) if any."""
  problems = check_eval_data(names, data_root, ppl_file=ppl_file)
  if problems:
    raise EvalDataError("\n".join(problems))
