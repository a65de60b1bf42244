"""Resuming a run: the latest checkpoint that restores, and the settings it must keep."""

from __future__ import annotations

from typing import Any, Callable

from minitron_jax.io import checkpoint

# Settings a resume must keep, saved with every checkpoint. The data settings fix the batches,
# their order and the units of the saved data position; the schedule settings fix the learning
# rate of every later update (`TrainConfig.allow_schedule_change` lets those change).
DATA_SETTINGS = ("mode", "global_batch_size", "seq_len", "seed")
SCHEDULE_SETTINGS = ("steps", "lr", "min_lr", "warmup_steps")


def restore_or_init(ckpt: checkpoint.Checkpointer, run_meta: dict, abstract_state,
                    init: Callable[[], Any], allow_schedule_change: bool = False,
                    say: Callable[[str], None] = print
                    ) -> tuple[int | None, Any, dict | None]:
  """(resumed step or None, state, data position) from the latest checkpoint, else fresh."""
  step, state, meta = ckpt.restore_latest(abstract_state, log=say)  # a damaged one is skipped
  if step is None:
    return None, init(), None
  check_resume(meta.get("run", {}), run_meta, ckpt.directory, allow_schedule_change)
  say(f"resuming from the checkpoint at step {step}")
  return step, state, meta["data"]


def check_resume(saved: dict, current: dict, directory: str,
                 allow_schedule_change: bool = False) -> None:
  """Refuses to resume with settings that differ from the checkpoint's, in one line.

  Checkpoints written before the schedule settings were recorded lack them; those are not
  checked (nothing to compare with).

  Raises:
    ValueError: naming each differing setting, its saved and its new value.
  """
  differ = [k for k, v in current.items()
            if saved.get(k) != v and not (k in SCHEDULE_SETTINGS and k not in saved)]
  if allow_schedule_change:
    differ = [k for k in differ if k not in SCHEDULE_SETTINGS]
  if not differ:
    return
  what = ", ".join(f"{k} (saved {saved.get(k)!r}, now {current[k]!r})" for k in differ)
  how = "rerun with the saved values or use a new output_dir"
  if all(k in SCHEDULE_SETTINGS for k in differ):
    how += ", or set allow_schedule_change to continue on the new learning-rate schedule"
  raise ValueError(f"{directory}: cannot resume: this run changes settings the checkpoint was "
                   f"written with: {what}; {how}")
