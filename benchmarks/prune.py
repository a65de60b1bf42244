"""Pruning costs and quality, measured side by side in one run:

1. importance overhead: activation importance (and Taylor gradients) against a plain jitted
   forward over the same calibration batches of SmolLM2-135M;
2. streaming pruning memory: an 8B-shaped random bf16 checkpoint written to disk, pruned to
   the Minitron-4B-Width shape by `prune.prune_checkpoint` in a fresh process, whose peak RSS
   is compared with the checkpoint's size;
3. quality: WikiText-2 perplexity of SmolLM2-135M pruned to about half its non-embedding
   parameters by every width importance method and every depth criterion (no distillation).

  python benchmarks/prune.py                               # everything (~15 min on 2 cores)
  python benchmarks/prune.py --parts=overhead --repeats=5
  python benchmarks/prune.py --parts=stream --workdir=/big/disk --keep
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from minitron_jax import axes, cli, config as C  # noqa: E402
from minitron_jax.evaluate import tasks  # noqa: E402
from minitron_jax.data import corpus as data, packing  # noqa: E402
from minitron_jax.evaluate import scoring as evaluate  # noqa: E402
from minitron_jax.io import hf as hf_io  # noqa: E402
from minitron_jax import model as M  # noqa: E402
from minitron_jax.prune import importance as I  # noqa: E402
from minitron_jax.prune import layer_importance as LI  # noqa: E402
from benchmarks.timing import best_seconds  # noqa: E402
from minitron_jax.prune import slicing  # noqa: E402

PARTS = ("overhead", "stream", "ppl")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Measurements to run, of {PARTS}.")
_MODEL = flags.DEFINE_string("model_dir", "smollm2-135m", "Model for overhead and ppl.")
_CALIB = flags.DEFINE_string("calib_data", "shakespeare", "Calibration text source.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per calibration sequence.", lower_bound=2)
_BATCH = flags.DEFINE_integer("batch", 8, "Calibration sequences per forward.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Calibration sampling and random-data seed.")
# 1. overhead
_OVERHEAD_N = flags.DEFINE_integer("overhead_samples", 16, "Calibration sequences timed.",
                                   lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (best is kept).", lower_bound=1)
# 2. streaming
_SRC_PRESET = flags.DEFINE_string("stream_preset", "llama3.1-8b", "Shape of the random checkpoint.")
_STREAM_HIDDEN = flags.DEFINE_integer("stream_hidden_size", 3072, "Stream prune target hidden "
                                      "size (Minitron-4B-Width).", lower_bound=1)
_STREAM_MLP = flags.DEFINE_integer("stream_intermediate_size", 9216, "Stream prune target MLP "
                                   "size (Minitron-4B-Width).", lower_bound=1)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the checkpoints go (default: a new "
                               "temporary directory).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoints written for the stream test.")
_MIN_FREE = flags.DEFINE_float("min_free_gb", 30.0, "Refuse the stream test with less free disk.")
_SHARD_MB = flags.DEFINE_integer("shard_mb", 0, "Shard size of the random checkpoint "
                                 "(0: hf_io's 5 GiB default).", lower_bound=0)
# 3. perplexity
_CALIB_N = flags.DEFINE_integer("calib_samples", 64, "Calibration sequences for pruning.",
                                lower_bound=1)
_HIDDEN = flags.DEFINE_integer("hidden_size", 432, "Width target: hidden size.")
_MLP = flags.DEFINE_integer("intermediate_size", 896, "Width target: MLP size.")
_LAYERS = flags.DEFINE_integer("num_layers", 15, "Depth target: layers kept.")
_WIDTH_METHODS = flags.DEFINE_list("width_methods", list(I.METHODS), "Width importance methods.")
_DEPTH_METHODS = flags.DEFINE_list("depth_methods", list(LI.METRICS), "Depth criteria.")
_LOSS_BATCHES = flags.DEFINE_integer("layer_loss_batches", 4, "Calibration batches per LM-loss "
                                     "evaluation of a removed block (as prune_job).",
                                     lower_bound=1)
_TASK = flags.DEFINE_string("layer_task", "winogrande", "Task of the accuracy depth criterion.")
_TASK_LIMIT = flags.DEFINE_integer("layer_task_limit", 100, "Examples of --layer_task.",
                                   lower_bound=1)
_DATA = flags.DEFINE_string("data_root", None, "Data folder (default: ../shared/data).")
_PPL_WINDOWS = flags.DEFINE_integer("ppl_windows", 8, "WikiText-2 test windows.", lower_bound=1)
_PPL_SEQ = flags.DEFINE_integer("ppl_seq_len", 512, "WikiText-2 window length.", lower_bound=2)


def table(header, rows) -> str:
  """Right-aligned columns, the first left-aligned."""
  rows = [[str(v) for v in r] for r in rows]
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(r):
    return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                     for i, (v, w) in enumerate(zip(r, widths)))

  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def non_embedding_params(cfg) -> int:
  return cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (
      1 if cfg.tie_word_embeddings else 2)


def calibration_batches(tok, n):
  stream = data.load_tokens(_CALIB.value, tok)
  calib = packing.calibration_samples(stream, num_samples=n, seq_len=_SEQ.value, seed=_SEED.value)
  return [calib[i:i + _BATCH.value] for i in range(0, n, _BATCH.value)]


# ------------------------------------------------------------------ 1. importance overhead


def measure_overhead(params, cfg, tok):
  batches = calibration_batches(tok, _OVERHEAD_N.value)
  fwd = jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"])
  grad = jax.jit(jax.grad(lambda p, t: I.lm_loss(p, cfg, t)))

  def forward():
    for b in batches:
      fwd(params, b).block_until_ready()

  def gradients():  # taylor_scores' loop, with a gradient function compiled once
    total = None
    for b in batches:
      g = grad(params, b)
      total = g if total is None else jax.tree_util.tree_map(lambda a, c: a + c, total, g)
    jax.block_until_ready(total)

  reps = _REPEATS.value
  runs = [("forward (logits)", "jit(forward)", best_seconds(forward, reps)),
          ("activation", "importance.activation_scores",
           best_seconds(lambda: I.activation_scores(params, cfg, batches), reps)),
          ("taylor gradients", "jit(grad(lm_loss)), summed", best_seconds(gradients, reps)),
          # taylor_scores jits a new function per call, so every call compiles again.
          ("taylor", "importance.taylor_scores", best_seconds(
              lambda: I.taylor_scores(params, cfg, batches), reps))]
  tokens = sum(b.size for b in batches)
  base = runs[0][2]
  print(f"\n1. importance overhead: {_MODEL.value}, {_OVERHEAD_N.value} x {_SEQ.value} tokens of "
        f"{_CALIB.value} in batches of {_BATCH.value}, {cfg.dtype}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, best of {reps} after a warm-up")
  print(table(["what", "call", "seconds", "tok/s", "vs forward"],
              [(w, c, f"{t:.3f}", f"{tokens / t:.0f}", f"{t / base:.2f}x") for w, c, t in runs]))
  return runs[1][2] / base


# ------------------------------------------------------------------ 2. streaming pruning

# The pruning process reports its own VmHWM (the kernel's high-water mark of its resident set,
# file-backed mapped pages included) rather than relying on ru_maxrss: Linux carries the
# parent's peak RSS over into a child's ru_maxrss at exec, so a child of a big parent looks big.
_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from minitron_jax.prune import slicing

def hwm():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

src, out, plan_path = sys.argv[2:5]
with np.load(plan_path) as z:
  plan = slicing.PrunePlan(**{k: z[k] for k in z.files})
imports = hwm()
t0 = time.perf_counter()
slicing.prune_checkpoint(src, out, plan)
print(json.dumps({"seconds": time.perf_counter() - t0, "imports_hwm": imports, "hwm": hwm()}))
"""


def random_bf16(shape, seed):
  """Random bfloat16 of magnitude 2^-7..2^-6 with random signs: random bits for sign and
  mantissa under a fixed exponent (fast, and never inf or NaN)."""
  n = int(np.prod(shape))
  bits = np.frombuffer(np.random.default_rng(seed).bytes(2 * n), np.uint16)
  return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16).reshape(shape)


def write_random_checkpoint(cfg, out_dir, seed, max_shard_bytes):
  """An HF directory of random bf16 tensors, generated and written one tensor at a time."""
  specs = axes.param_specs(cfg)  # HF's order: embeddings, layer by layer, norm, head
  names = ([(s, s.hf_name) for s in specs if s.path == ("embed",)]
           + [(s, s.hf_name.format(i=i)) for i in range(cfg.num_hidden_layers)
              for s in specs if s.stacked]
           + [(s, s.hf_name) for s in specs if s.path in (("final_norm",), ("lm_head",))])
  bf16 = np.dtype(ml_dtypes.bfloat16)
  tensors = []
  for k, (spec, name) in enumerate(names):
    shape = axes.hf_shape(spec, cfg)
    tensors.append((name, shape, bf16, lambda shape=shape, k=k: random_bf16(shape, (seed, k))))
  os.makedirs(out_dir)
  hf_io.write_weights(out_dir, tensors, max_shard_bytes)
  hf_io.write_config(out_dir, cfg, torch_dtype="bfloat16")
  return max((int(np.prod(t[1])) * bf16.itemsize, t[0]) for t in tensors)


def size(n: float) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def verify_pruned(src, out, plan, want):
  """Config, every tensor's shape, and two tensors' values against the source."""
  got = hf_io.load_config(out)
  for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size"):
    if getattr(got, name) != getattr(want, name):
      raise AssertionError(f"pruned {name}={getattr(got, name)}, expected {getattr(want, name)}")
  files, srcs = hf_io.open_checkpoint(out), hf_io.open_checkpoint(src)
  n = 0
  for spec in axes.param_specs(want):
    for name in ([spec.hf_name.format(i=i) for i in range(want.num_hidden_layers)]
                 if spec.stacked else [spec.hf_name]):
      if files[name].shape(name) != axes.hf_shape(spec, want):
        raise AssertionError(f"{name}: {files[name].shape(name)}")
      n += 1
  if n != len(files):
    raise AssertionError(f"{len(files)} tensors, expected {n}")
  embed = plan.embed if plan.embed is not None else slice(None)
  mlp = plan.mlp[0] if plan.mlp is not None else np.arange(want.intermediate_size)
  name = "model.layers.0.input_layernorm.weight"
  ok = np.array_equal(files[name].get(name), srcs[name].get(name)[embed])
  name = "model.layers.0.mlp.gate_proj.weight"
  row = len(mlp) - 1
  ok &= np.array_equal(files[name].get(name)[row], srcs[name].get(name)[mlp[row]][embed])
  if not ok:
    raise AssertionError("pruned values differ from the source's kept entries")
  return n


def measure_stream():
  cfg = C.preset(_SRC_PRESET.value)
  targets = slicing.Targets(hidden_size=_STREAM_HIDDEN.value,
                            intermediate_size=_STREAM_MLP.value)
  plan = slicing.make_plan(cfg, targets, I.random_scores(cfg, _SEED.value))
  want = slicing.pruned_config(cfg, plan)
  src_bytes = cfg.num_params() * 2
  made = _WORKDIR.value is None
  work = tempfile.mkdtemp(prefix="prune-bench-") if made else os.path.abspath(_WORKDIR.value)
  os.makedirs(work, exist_ok=True)
  free = shutil.disk_usage(work).free
  if free < _MIN_FREE.value * 1e9:
    if made:
      shutil.rmtree(work)
    raise ValueError(f"{work}: {free / 1e9:.1f} GB free, the stream test needs "
                     f"{_MIN_FREE.value:.0f} GB (source {src_bytes / 1e9:.1f} GB + pruned "
                     f"{want.num_params() * 2 / 1e9:.1f} GB); pass --workdir on a bigger disk")
  src, out = os.path.join(work, "source"), os.path.join(work, "pruned")
  plan_path = os.path.join(work, "plan.npz")
  for p in (src, out):
    if os.path.exists(p):
      raise FileExistsError(f"{p}: exists; remove it or pick another --workdir")
  try:
    t0 = time.perf_counter()
    largest, largest_name = write_random_checkpoint(
        cfg, src, _SEED.value, _SHARD_MB.value * 2**20 or hf_io.DEFAULT_MAX_SHARD_BYTES)
    os.sync()
    write_s = time.perf_counter() - t0
    np.savez(plan_path, **{f.name: np.asarray(getattr(plan, f.name))
                           for f in dataclasses.fields(plan) if getattr(plan, f.name) is not None})
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, ROOT, src, out, plan_path],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    os.sync()  # no write-back of the output left to slow what runs next
    if proc.returncode:
      raise RuntimeError(f"the pruning process failed (exit status {proc.returncode})")
    child = json.loads(stdout.strip().splitlines()[-1])
    peak, ru_maxrss = child["hwm"], usage.ru_maxrss * 1024  # Linux reports KiB
    n_tensors = verify_pruned(src, out, plan, want)
    src_disk, out_disk = dir_bytes(src), dir_bytes(out)
    shards = sum(f.endswith(".safetensors") for f in os.listdir(src))
  finally:
    if not _KEEP.value:
      for p in (src, out, plan_path):
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.remove(p)
      if made:
        shutil.rmtree(work, ignore_errors=True)
  print(f"\n2. streaming pruning: random bf16 {_SRC_PRESET.value} ({cfg.num_params() / 1e9:.2f}B "
        f"params, {shards} shards) -> hidden {want.hidden_size}, MLP "
        f"{want.intermediate_size} ({want.num_params() / 1e9:.2f}B) with prune_checkpoint in a "
        f"fresh process; peak RSS = that process's VmHWM (memory-mapped pages included)")
  rows = [("source checkpoint", size(src_disk), f"written in {write_s:.0f} s"),
          ("largest source tensor", size(largest), largest_name),
          ("pruned checkpoint", size(out_disk),
           f"{n_tensors} tensors; config, shapes, values checked"),
          ("peak RSS after imports", size(child["imports_hwm"]), "python + numpy + jax"),
          ("peak RSS", size(peak), f"VmHWM; {peak / src_disk:.3f} of the checkpoint"),
          ("ru_maxrss (wait4)", size(ru_maxrss), "not used: inherits the parent's peak at exec"),
          ("prune time", f"{child['seconds']:.0f} s", f"{wall:.0f} s with process start")]
  print(table(["what", "value", "note"], rows))
  return peak / src_disk


# ------------------------------------------------------------------ 3. perplexity


def measure_ppl(params, cfg, tok):
  root = _DATA.value or tasks.default_data_root()
  path = os.path.join(root, "wikitext-2", "test.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (--data_root)")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  max_len, tok.model_max_length = tok.model_max_length, int(1e30)  # the whole text is intended
  try:
    ids = tok(text, add_special_tokens=False)["input_ids"]
  finally:
    tok.model_max_length = max_len
  ids = ids[:_PPL_WINDOWS.value * _PPL_SEQ.value]
  batches = calibration_batches(tok, _CALIB_N.value)

  def ppl(p, c):
    return evaluate.perplexity(p, c, ids, seq_len=_PPL_SEQ.value, max_windows=_PPL_WINDOWS.value,
                               progress=False)["ppl"]

  base_ne = non_embedding_params(cfg)
  rows = [("teacher", "-", cfg, 0.0, ppl(params, cfg), "")]
  width = slicing.Targets(hidden_size=_HIDDEN.value, intermediate_size=_MLP.value)
  for method in _WIDTH_METHODS.value:
    t0 = time.perf_counter()
    scores = I.compute_scores(method, params, cfg, batches, seed=_SEED.value)
    secs = time.perf_counter() - t0
    p, c = slicing.prune(params, cfg, slicing.make_plan(cfg, width, scores))
    rows.append((method, "width", c, secs, ppl(p, c), ""))
    del p
  depth = slicing.Targets(num_hidden_layers=_LAYERS.value)
  n_drop = cfg.num_hidden_layers - _LAYERS.value
  for metric in _DEPTH_METHODS.value:
    t0 = time.perf_counter()
    if metric == "block_importance":  # the individually least important layers
      scores, block = LI.block_importance(params, cfg, batches, block_sizes=(1,))[1], False
    elif metric == "lm_loss":  # the contiguous block whose removal raises the loss least
      _, loss = LI.lm_loss_drop(params, cfg, batches[:_LOSS_BATCHES.value],
                                block_sizes=(n_drop,))
      scores, block = loss[n_drop], True
    elif metric == "accuracy":
      _, acc = LI.accuracy_drop(params, cfg, tok, _TASK.value, root, block_sizes=(n_drop,),
                                limit=_TASK_LIMIT.value)
      scores, block = -acc[n_drop], True
    else:
      raise AssertionError(metric)
    secs = time.perf_counter() - t0
    plan = slicing.make_plan(cfg, depth, layer_scores=scores, drop_block=block)
    p, c = slicing.prune(params, cfg, plan)
    dropped = sorted(set(range(cfg.num_hidden_layers)) - set(int(i) for i in plan.layers))
    label = metric if metric != "accuracy" else f"accuracy ({_TASK.value})"
    rows.append((label, "depth", c, secs, ppl(p, c), _ranges(dropped)))
    del p
  teacher = rows[0][4]
  print(f"\n3. WikiText-2 test perplexity ({_PPL_WINDOWS.value} x {_PPL_SEQ.value} tokens) of "
        f"{_MODEL.value} pruned without distillation; calibration {_CALIB_N.value} x "
        f"{_SEQ.value} tokens of {_CALIB.value}; width: hidden {_HIDDEN.value}, MLP {_MLP.value}; "
        f"depth: {_LAYERS.value} of {cfg.num_hidden_layers} layers; score s = importance wall "
        f"time, compilation included")
  print(table(["method", "kind", "params", "non-emb", "of teacher", "score s", "perplexity",
               "vs teacher", "dropped layers"],
              [(m, k, f"{c.num_params() / 1e6:.1f}M", f"{non_embedding_params(c) / 1e6:.1f}M",
                f"{non_embedding_params(c) / base_ne:.1%}", f"{s:.1f}" if k != "-" else "-",
                _num(v), _num(v / teacher) + "x", d) for m, k, c, s, v, d in rows]))
  return {m: v for m, k, _, _, v, _ in rows if k == "width"}


def _num(v: float) -> str:
  return f"{v:.2f}" if v < 1e5 else f"{v:.2e}"


def _ranges(xs) -> str:
  """[0, 1, 2, 5] -> '0-2,5'."""
  out, start = [], None
  for i, x in enumerate(xs):
    if start is None:
      start = x
    if i + 1 == len(xs) or xs[i + 1] != x + 1:
      out.append(f"{start}" if start == x else f"{start}-{x}")
      start = None
  return ",".join(out)


@cli.main_wrapper
def main(argv):
  del argv
  for flag, allowed in ((_PARTS, PARTS), (_WIDTH_METHODS, I.METHODS),
                        (_DEPTH_METHODS, LI.METRICS)):
    bad = sorted(set(flag.value) - set(allowed))
    if bad:
      raise ValueError(f"--{flag.name}: {bad} not in {allowed}")
  summary = []
  if {"overhead", "ppl"} & set(_PARTS.value):
    params, cfg, tok, _ = hf_io.load_model(_MODEL.value, "float32")
  if "overhead" in _PARTS.value:
    r = measure_overhead(params, cfg, tok)
    summary.append(f"importance overhead: activation / forward = {r:.2f}x (target <= 1.3x): "
                   f"{'met' if r <= 1.3 else 'NOT met'}")
  if "stream" in _PARTS.value:
    r = measure_stream()
    summary.append(f"streaming prune: peak RSS = {r:.3f} of the checkpoint (target <= 0.25): "
                   f"{'met' if r <= 0.25 else 'NOT met'}")
  if "ppl" in _PARTS.value:
    width = measure_ppl(params, cfg, tok)
    if "random" in width:
      worse = [m for m, v in width.items() if m != "random" and not v < width["random"]]
      summary.append("width criteria beat the random baseline (lower perplexity): " + (
          "met" if not worse else f"NOT met by {', '.join(worse)}"))
  print("\nsummary")
  for line in summary:
    print(f"  {line}")


if __name__ == "__main__":
  app.run(main)
