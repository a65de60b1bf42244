"""Distillation from cached teacher logits against the live teacher's top-K, side by side.

One run: write the teacher's top-K logits of `--steps` training batches (WikiText-2 valid by
default) once; distil the same student for the same steps twice from the same start, once
with the live teacher (`DistillConfig(top_k=K)`) and once from the cache; evaluate both on the
same held-out windows. Prints the held-out perplexities and their ratio, the training seconds
per step (compilation and evaluation excluded) and their ratio, and the cache's bytes per
token and time to write.

The student is the teacher width-pruned to the recipe's width shape (`configs/base.py`), units
ranked by weight magnitude, unless `--student_dir` is given.

  python benchmarks/teacher_cache.py --steps=8 --k=64
"""

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from minitron_jax import cli  # noqa: E402
from minitron_jax.data import corpus as data, holdout  # noqa: E402
from minitron_jax.distill import losses as distill  # noqa: E402
from minitron_jax.distill import run as trainer  # noqa: E402
from minitron_jax.distill import teacher_cache as tc  # noqa: E402
from minitron_jax.distill.step import TrainConfig  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax.prune import importance as I  # noqa: E402
from minitron_jax.prune import slicing  # noqa: E402

_DEFAULT = base.get_config()
_TEACHER = flags.DEFINE_string("teacher", "smollm2-135m", "Teacher model.")
_STUDENT = flags.DEFINE_string("student_dir", None, "Student (default: width-pruned teacher).")
_DATA = flags.DEFINE_string("data", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "..", "shared", "data", "wikitext-2", "valid.txt"),
    "Training text (default: WikiText-2 valid beside the project).")
_K = flags.DEFINE_integer("k", 64, "Top-K logits cached and distilled.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", _DEFAULT.distill.steps, "Updates per run.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", _DEFAULT.distill.global_batch_size, "Rows per update.")
_SEQ = flags.DEFINE_integer("seq_len", _DEFAULT.distill.seq_len, "Tokens per row.")
_EVAL = flags.DEFINE_integer("eval_windows", 8, "Held-out windows of seq_len tokens.")
_CACHE_DTYPE = flags.DEFINE_enum("cache_dtype", "float32", ["float32", "bfloat16"],
                                 "dtype of the cached logits.")


@cli.main_wrapper
def main(argv):
  del argv
  teacher, tcfg, tok, _ = hf_io.load_model(_TEACHER.value)
  if _STUDENT.value:
    student, scfg, _, _ = hf_io.load_model(_STUDENT.value, with_tokenizer=False)
  else:
    plan = slicing.make_plan(tcfg, slicing.Targets(**dict(_DEFAULT.prune.width)),
                             I.magnitude_scores(teacher, tcfg))
    student, scfg = slicing.prune(teacher, tcfg, plan)
  stream = data.load_tokens(_DATA.value, tok)
  stream, held = holdout.split_holdout(stream, _EVAL.value * _SEQ.value)
  d = _DEFAULT.distill
  cfg = TrainConfig(steps=_STEPS.value, global_batch_size=_BATCH.value, seq_len=_SEQ.value,
                    lr=d.lr, min_lr=d.min_lr, warmup_steps=min(d.warmup_steps, _STEPS.value - 1),
                    dtype="float32", save_every=0, eval_every=_STEPS.value,
                    eval_windows=_EVAL.value, log_every=max(1, _STEPS.value // 4),
                    async_checkpointing=False)
  pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
  work = tempfile.mkdtemp(prefix="teacher_cache_bench_")
  try:
    cache_dir = os.path.join(work, "cache")
    t0 = time.perf_counter()
    tc.write_for_run(cache_dir, cfg, teacher, tcfg, stream, _K.value, _CACHE_DTYPE.value, pad)
    write_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(cache_dir)
               for f in fs)
    runs = {}
    for name in ("live", "cached"):
      kw = (dict(teacher_params=teacher, dcfg=distill.DistillConfig(top_k=_K.value))
            if name == "live" else dict(dcfg=distill.DistillConfig(), teacher_cache=cache_dir))
      res = trainer.fit(cfg, model_params=student, model_cfg=scfg, train_tokens=stream,
                        output_dir=os.path.join(work, name), teacher_cfg=tcfg,
                        eval_tokens=held, pad_id=pad, **kw)
      runs[name] = (res.evals[-1]["eval/ppl"], res.seconds / _STEPS.value)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  tokens = _STEPS.value * _BATCH.value * _SEQ.value
  (ppl_l, s_l), (ppl_c, s_c) = runs["live"], runs["cached"]
  print(f"student {scfg.hidden_size}/{scfg.intermediate_size}/{scfg.num_hidden_layers} layers, "
        f"{_STEPS.value} steps x {_BATCH.value} x {_SEQ.value} tokens, top-{_K.value}")
  print(f"held-out perplexity: live top-K {ppl_l:.3f}, cached {ppl_c:.3f} "
        f"(cached / live = {ppl_c / ppl_l:.4f})")
  print(f"seconds per step: live {s_l:.2f}, cached {s_c:.2f} (live / cached = {s_l / s_c:.2f}x)")
  print(f"cache: {tc.bytes_per_token(_K.value, _CACHE_DTYPE.value)} bytes per token by the "
        f"formula, {disk / tokens:.1f} on disk; written in {write_s:.1f}s "
        f"({write_s / _STEPS.value:.2f}s per step)")


if __name__ == "__main__":
  app.run(main)
