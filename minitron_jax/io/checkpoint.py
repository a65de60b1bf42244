"""Train-state checkpoints with orbax: save every N steps, keep the last few, resume the latest.

A checkpoint is one orbax step directory holding two items: `state` (the sharded train state,
written by every process in parallel) and `meta` (JSON: the data iterator's position and the
run settings it was written under). Orbax writes each step under a temporary name and renames
it when complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import orbax.checkpoint as ocp


class Checkpointer:
  """Save / restore of (train state, JSON metadata) in one directory.

  Args:
    directory: where step directories go (created).
    keep: how many checkpoints to keep (oldest deleted first).
    async_save: copy arrays to host synchronously, then write files in a background thread
      while training continues (the copy is what makes donating the state afterwards safe).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # leftovers of a save killed half-way
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Starts saving `step` (every process must call). Returns False if it already exists."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_latest(self, abstract_state: Any,
                     log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
                     ) -> tuple[int | None, Any, dict | None]:
    """(step, state, meta) of the newest checkpoint that restores, or (None, None, None).

    A checkpoint that fails to restore (a truncated or missing file, a missing shard) is
    reported with what was wrong and deleted, so the run falls back to the one before it and
    its later save of that step is not refused; an older one is tried next.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # orbax/tensorstore raise many types for a damaged file
        what = " ".join(str(e).split())[:300]
        log(f"warning: the checkpoint at step {step} in {self.directory} cannot be restored "
            f"({type(e).__name__}: {what}); deleting it and falling back to the one before")
        self._manager.delete(step)
        continue
      return step, state, meta
    return None, None, None

  def wait(self) -> None:
    """Blocks until any background save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
