"""Few-shot prompts, built as lm-evaluation-harness (v0.4) builds them, and MMLU's averages.

A k-shot context is ``description + shot_1 + ... + shot_k + query``, each shot being its
gold request rendered whole (``context + continuation``, the continuation holding the target
delimiter " ") followed by the few-shot delimiter "\\n\\n"; a multiple-input task
(WinoGrande) renders a shot as its gold option's context and the shared continuation, as the
harness does.

Which items become shots:

- MMLU from the hub (``cais/mmlu``): the first k of the subject's dev split (the harness's
  ``first_n`` sampler).
- MMLU from MMLU-Redux (no dev split): the first k questions of the same subject in file
  order, never the scored one: the harness's ``first_n`` sampler on the scored split.
- Every other task from the hub with a train split (``TaskSpec.train``: WinoGrande, PIQA,
  HellaSwag, ARC, OpenBookQA): k items of that split, drawn as the harness draws them
  (``split_shot_indices``: k + 1 per item, equal rows dropped, where the task's YAML has no
  test split; k per item where it scores its test split).
- Every other task from local files (and LAMBADA, which has no train split): k items of the
  scored split itself, never the scored one, drawn as the harness draws them when the
  few-shot split is the scored split (one ``random.Random(1234)`` per task, ``k + 1`` drawn
  per item in order, the scored item dropped).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Callable, Sequence

from minitron_jax.evaluate.stats import stderr
from minitron_jax.evaluate.tasks import Example, Request

FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


def render_shot(ex: Example) -> str:
  """A solved example as a shot: its gold request whole, then the few-shot delimiter."""
  gold = ex.requests[ex.label]
  return gold.context + gold.continuation + FEWSHOT_DELIMITER


def prompted(ex: Example, shots: Sequence[Example] = ()) -> Example:
  """`ex` with its description and `shots` put before every request's context."""
  prefix = ex.description + "".join(render_shot(s) for s in shots)
  requests = tuple(Request(prefix + r.context, r.continuation) for r in ex.requests)
  return dataclasses.replace(ex, requests=requests, description="")


def first_n_shots(examples: Sequence[Example], k: int,
                  pool: Sequence[Example] | None = None) -> list[list[Example]]:
  """The harness's ``first_n`` sampler per subject (``Example.group``): the first k of the
  subject's items in `pool`, or, without a pool, of `examples` less the scored item."""
  by_group: dict[str, list[int]] = {}
  source = examples if pool is None else pool
  for i, ex in enumerate(source):
    by_group.setdefault(ex.group, []).append(i)
  out = []
  for i, ex in enumerate(examples):
    members = [j for j in by_group.get(ex.group, []) if pool is not None or j != i]
    if len(members) < k:
      raise ValueError(f"{ex.task} {ex.group or ''}: {k} shots asked, {len(members)} items "
                       f"to draw them from")
    out.append([source[j] for j in members[:k]])
  return out


def random_shots(examples: Sequence[Example], k: int, seed: int = FEWSHOT_SEED
                 ) -> list[list[Example]]:
  """The harness's default sampler with the few-shot split equal to the scored split: per
  item in order, k + 1 drawn from all items by one ``Random(seed)``, the scored item (and
  any item equal to it) dropped, the first k kept."""
  if k >= len(examples):
    raise ValueError(f"{k} shots asked, but the task has {len(examples)} items")
  rnd = random.Random(seed)
  out = []
  for i, ex in enumerate(examples):
    drawn = [j for j in rnd.sample(range(len(examples)), k + 1) if examples[j] != ex][:k]
    if len(drawn) < k:  # duplicates of the scored item were drawn: redraw without them
      drawn = rnd.sample([j for j in range(len(examples)) if examples[j] != ex], k)
    out.append([examples[j] for j in drawn])
  return out


def split_shot_indices(n_pool: int, scored_rows: Sequence[Any], pool_row: Callable[[int], Any],
                       k: int, exclude: bool = True, seed: int = FEWSHOT_SEED) -> list[list[int]]:
  """The harness's default sampler over a few-shot split apart from the scored one: one
  ``Random(seed)`` per task, per scored row in order. With `exclude` (the harness passes the
  scored document when the task's few-shot split equals its test split, both unset for tasks
  that score their validation split) ``k + 1`` indices are drawn, pool rows equal to the
  scored row dropped and the first k kept (redrawn from the rest if fewer remain); without
  it, k are drawn."""
  if k > n_pool - exclude:
    raise ValueError(f"{k} shots asked, but the few-shot split has {n_pool} items")
  rnd = random.Random(seed)
  out = []
  for row in scored_rows:
    if not exclude:
      out.append(rnd.sample(range(n_pool), k))
      continue
    drawn = [j for j in rnd.sample(range(n_pool), k + 1) if pool_row(j) != row][:k]
    if len(drawn) < k:
      drawn = rnd.sample([j for j in range(n_pool) if pool_row(j) != row], k)
    out.append(drawn)
  return out


def with_shots(examples: Sequence[Example], k: int, *, limit: int | None = None,
               dev: Sequence[Example] | None = None) -> list[Example]:
  """The first `limit` of `examples`, each with its description and k shots in its context.

  Shots come from the whole task, not only the first `limit` items, as in the harness.

  Args:
    examples: the scored split, whole.
    k: shots per item (0: the description only).
    limit: keep only the first `limit` items.
    dev: MMLU's dev split (shots by subject); None for MMLU-Redux, which has none.
  """
  if k < 0:
    raise ValueError(f"num_fewshot must be >= 0, got {k}")
  scored = list(examples if limit is None else examples[:limit])
  if k == 0 or not scored:
    return [prompted(ex) for ex in scored]
  if scored[0].task == "mmlu":
    shots = first_n_shots(scored, k, dev) if dev is not None else \
        first_n_shots(examples, k)[:len(scored)]
  else:
    shots = random_shots(examples, k)[:len(scored)]
  return [prompted(ex, s) for ex, s in zip(scored, shots)]


def group_summary(groups: Sequence[str], correct: Sequence[bool]) -> dict:
  """Micro (every item alike) and macro (every group alike) accuracy with standard errors;
  the macro error combines the groups' binomial errors as independent."""
  by: dict[str, list[bool]] = {}
  for g, c in zip(groups, correct):
    by.setdefault(g, []).append(bool(c))
  n = len(correct)
  micro = sum(map(bool, correct)) / n
  accs = {g: sum(v) / len(v) for g, v in sorted(by.items())}
  macro = sum(accs.values()) / len(accs)
  macro_se = math.sqrt(sum(stderr(accs[g], len(v)) ** 2 for g, v in by.items())) / len(accs)
  return {"acc": micro, "acc_stderr": stderr(micro, n), "acc_macro": macro,
          "acc_macro_stderr": macro_se, "groups": len(accs), "group_acc": accs}
