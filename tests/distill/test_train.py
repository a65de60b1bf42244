"""The training run: sharding and multi-host equivalence, exact resume, the NaN guard, teacher
correction, the CLI, and a real distillation of a width-halved SmolLM2-135M.

Multi-device runs happen in subprocesses (this file doubles as their worker script) because
the number of forced CPU devices must be set before jax is imported.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 300


# ---------------------------------------------------------------------------- worker side


def tiny_problem():
  """A tiny teacher, a narrower one-layer student and a synthetic packed corpus."""
  from minitron_jax import axes, config
  from minitron_jax.data import corpus as data

  def init(cfg, seed):  # numpy, not model.init_params: no compiles at worker start-up
    rng = np.random.default_rng(seed)
    return axes.tree_from_leaves(
        (s, np.ones(axes.shape(s, cfg), np.float32) if s.path[-1].endswith("norm") else
         (0.02 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
        for s in axes.param_specs(cfg))

  tcfg = config.preset("tiny")
  scfg = tcfg.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
  tp, sp = init(tcfg, 0), init(scfg, 1)
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 70, 300)
  tokens = rng.integers(3, tcfg.vocab_size, lengths.sum()).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tp, tcfg, sp, scfg, data.TokenStream(tokens, offsets)


def worker(spec: dict) -> None:
  """Three distillation updates on `spec["mesh"]`; process 0 writes losses and params."""
  import jax

  if spec.get("coordinator"):
    jax.distributed.initialize(coordinator_address=spec["coordinator"],
                               num_processes=spec["num_processes"],
                               process_id=spec["process_id"])
  from minitron_jax.distill import losses as distill
  from minitron_jax import sharding
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  cfg = TrainConfig(steps=3, global_batch_size=8, micro_batch_size=4, seq_len=32, lr=3e-3,
                    warmup_steps=1, dtype="float32", mesh=spec["mesh"], save_every=0,
                    log_every=100)
  dcfg = distill.DistillConfig(hidden_loss="cosine", embedding_weight=0.1, ce_weight=0.1,
                               layer_map=(1,))
  res = trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                    output_dir=spec["out"], teacher_params=tp, teacher_cfg=tcfg, dcfg=dcfg)
  params = sharding.host_params(res.params)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(spec["out"], "params.npz"), **flat)
    with open(os.path.join(spec["out"], "result.json"), "w") as f:
      json.dump({"history": res.history, "devices": jax.device_count(),
                 "processes": jax.process_count()}, f)


def killing_worker(spec: dict) -> None:
  """The distillation command line's job, SIGKILLed once checkpoint `kill_after_save` is on
  disk (a crash at the worst moment: right after a save, before anything else)."""
  import importlib.util

  from absl import flags

  from minitron_jax.distill import run as trainer

  module = importlib.util.spec_from_file_location(
      "distill_cli", os.path.join(ROOT, "launch", "distill.py"))
  launcher = importlib.util.module_from_spec(module)
  module.loader.exec_module(launcher)
  flags.FLAGS(["distill.py", *spec["args"]])

  def kill(step):
    if step == spec["kill_after_save"]:
      os.kill(os.getpid(), signal.SIGKILL)

  trainer.run(launcher.build_job(), on_saved=kill)


def preempt_worker(spec: dict) -> None:
  """A 2-process distillation that the test preempts with SIGTERM to one process; each process
  records where its run stopped."""
  import jax

  jax.distributed.initialize(coordinator_address=spec["coordinator"], num_processes=2,
                             process_id=spec["process_id"])
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  cfg = TrainConfig(steps=spec["steps"], global_batch_size=8, seq_len=32, lr=1e-3,
                    warmup_steps=1, dtype="float32", mesh="data:2", save_every=0, log_every=1)
  res = trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                    output_dir=spec["out"], teacher_params=tp, teacher_cfg=tcfg,
                    dcfg=distill.DistillConfig(), log=lambda line: print(line, flush=True))
  with open(os.path.join(spec["out"], f"stop{spec['process_id']}-{spec['run']}.json"), "w") as f:
    json.dump({"step": res.step, "preempted": res.preempted,
               "resumed_from": res.resumed_from}, f)


# ---------------------------------------------------------------------------- test side


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  return env


def _start(spec: dict, devices: int) -> subprocess.Popen:
  os.makedirs(spec["out"], exist_ok=True)
  log = open(os.path.join(spec["out"], f"log{spec.get('process_id', 0)}.txt"), "w")
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                          env=_env(devices), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_all(procs, outs, timeout=TIMEOUT_S):
  """Waits for every process; on failure or timeout kills the rest and shows their logs."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode != 0 for p in procs):
    logs = "\n".join(open(os.path.join(o, f)).read()[-3000:] for o in set(outs)
                     for f in sorted(os.listdir(o)) if f.startswith("log"))
    pytest.fail(f"worker(s) failed with {[p.returncode for p in procs]}:\n{logs}")


def _result(out):
  with open(os.path.join(out, "result.json")) as f:
    res = json.load(f)
  return res, dict(np.load(os.path.join(out, "params.npz")))


def _assert_same(a, b, tol=1e-4):
  (ra, pa), (rb, pb) = a, b
  assert len(ra["history"]) == len(rb["history"]) == 3
  for x, y in zip(ra["history"], rb["history"]):
    for k in ("distill/loss", "distill/kl", "distill/hidden", "distill/ce", "train/grad_norm"):
      assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (k, x[k], y[k])
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("one"))
  _wait_all([_start({"mesh": "data:1", "out": out}, 1)], [out])
  return _result(out)


def test_sharding_changes_nothing_but_speed(one_device, tmp_path):
  out = str(tmp_path / "eight")
  _wait_all([_start({"mesh": "data:2,fsdp:2,tensor:2", "out": out}, 8)], [out])
  res = _result(out)
  assert res[0]["devices"] == 8
  _assert_same(one_device, res)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(one_device, tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [_start({"mesh": "data:2,fsdp:2", "out": multi, "coordinator": coordinator,
                   "num_processes": 2, "process_id": i}, 2) for i in range(2)]
  procs.append(_start({"mesh": "data:2,fsdp:2", "out": single}, 4))
  _wait_all(procs, [multi, multi, single])
  a, b = _result(single), _result(multi)
  assert (a[0]["devices"], a[0]["processes"]) == (4, 1)
  assert (b[0]["devices"], b[0]["processes"]) == (4, 2)
  _assert_same(a, b)
  _assert_same(one_device, b)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tmp_path):
  """A pod's preemption notice reaches one host: every process saves the same step, exits 0,
  and the same command resumes from it."""
  from minitron_jax.io import checkpoint, files

  out = str(tmp_path / "run")
  spec = {"out": out, "steps": 60, "coordinator": f"127.0.0.1:{_free_port()}", "run": 1}
  procs = [_start({**spec, "process_id": i}, 1) for i in range(2)]
  log0, deadline = os.path.join(out, "log0.txt"), time.time() + TIMEOUT_S
  while time.time() < deadline and all(p.poll() is None for p in procs):
    with open(log0) as f:
      if any(line.startswith("step 3/") for line in f):
        break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  _wait_all(procs, [out, out])
  stops = [files.read_json(os.path.join(out, f"stop{i}-1.json")) for i in range(2)]
  assert stops[0] == stops[1] and stops[0]["preempted"], stops
  step = stops[0]["step"]
  assert 3 <= step < 60
  assert checkpoint.Checkpointer(os.path.join(out, "checkpoints")).all_steps() == [step]
  spec.update(run=2, coordinator=f"127.0.0.1:{_free_port()}")
  _wait_all([_start({**spec, "process_id": i}, 1) for i in range(2)], [out, out])
  for i in range(2):
    assert files.read_json(os.path.join(out, f"stop{i}-2.json")) == {
        "step": 60, "preempted": False, "resumed_from": step}


def test_split_holdout_keeps_whole_documents_out_of_training():
  from minitron_jax.data import corpus as data, holdout

  stream = data.TokenStream(np.arange(100, dtype=np.int32),
                            np.array([0, 30, 55, 80, 100], np.int64))
  train_stream, held = holdout.split_holdout(stream, 15)
  assert len(held) == 20 and held[0] == 80  # moved back to the start of the last document
  np.testing.assert_array_equal(train_stream.offsets, [0, 30, 55, 80])
  train_stream, held = holdout.split_holdout(data.TokenStream(
      np.arange(100, dtype=np.int32), np.array([0, 100], np.int64)), 15)
  assert len(held) == 15 and len(train_stream) == 85  # one document: cut inside it
  with pytest.raises(ValueError, match="too small"):
    holdout.split_holdout(stream, 60)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  from minitron_jax.io import checkpoint
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  cfg = TrainConfig(steps=6, global_batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1,
                    dtype="float32", save_every=2, log_every=100)

  def nan_at_update_3(step, loss, grads):  # step is 0-based: update 3 is step 2
    bad = step + 1 == 3
    return (jnp.where(bad, jnp.nan, loss),
            jax.tree_util.tree_map(lambda g: jnp.where(bad, jnp.nan, g), grads))

  with pytest.raises(trainer.NonFiniteLossError) as err:
    trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                output_dir=str(tmp_path), teacher_params=tp, teacher_cfg=tcfg,
                dcfg=distill.DistillConfig(), step_hook=nan_at_update_3)
  assert "step 3" in str(err.value) and "step 2" in str(err.value)
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
  assert ckpt.all_steps() == [2]
  state, meta = ckpt.restore(2, None)
  assert meta["step"] == 2 and int(state["step"]) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  from minitron_jax.io import checkpoint
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  cfg = TrainConfig(steps=4, global_batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1,
                    dtype="float32", save_every=0, log_every=1)
  kw = dict(model_params=sp, model_cfg=scfg, train_tokens=stream, output_dir=str(tmp_path),
            teacher_params=tp, teacher_cfg=tcfg, dcfg=distill.DistillConfig())
  lines, handler = [], signal.getsignal(signal.SIGTERM)

  def log(line):  # a scheduler's SIGTERM arriving while step 2 runs
    lines.append(line)
    if line.startswith("step 2/"):
      os.kill(os.getpid(), signal.SIGTERM)

  res = trainer.fit(cfg, log=log, **kw)
  assert res.preempted and res.step == 2
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps() == [2]
  res = trainer.fit(cfg, log=lines.append, **kw)
  assert not res.preempted and res.resumed_from == 2 and res.step == 4
  assert [r["step"] for r in res.history] == [3, 4]
  assert signal.getsignal(signal.SIGTERM) == handler  # the handler is put back


def test_resume_refuses_a_changed_schedule_or_data_order(tmp_path):
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  base = dict(steps=4, global_batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1,
              dtype="float32", save_every=2, log_every=100)
  kw = dict(model_params=sp, model_cfg=scfg, train_tokens=stream, output_dir=str(tmp_path),
            teacher_params=tp, teacher_cfg=tcfg, dcfg=distill.DistillConfig())
  full = trainer.fit(TrainConfig(**base), **kw)
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if the run had died after step 2

  with pytest.raises(ValueError) as e:
    trainer.fit(TrainConfig(**{**base, "steps": 6, "lr": 2e-3}), **kw)
  msg = str(e.value)
  assert "\n" not in msg
  assert "steps (saved 4, now 6)" in msg and "lr (saved 0.001, now 0.002)" in msg, msg
  assert "min_lr" not in msg and "output_dir" in msg and "allow_schedule_change" in msg
  # The override covers the schedule only: data settings still have to match.
  with pytest.raises(ValueError, match=r"seed \(saved 0, now 1\)") as e:
    trainer.fit(TrainConfig(**{**base, "steps": 6, "seed": 1, "allow_schedule_change": True}),
                **kw)
  assert "allow_schedule_change" not in str(e.value) and "steps" not in str(e.value)

  res = trainer.fit(TrainConfig(**base), **kw)  # the same settings resume
  assert res.resumed_from == 2 and res.step == 4
  for a, b in zip(full.history[2:], res.history):
    assert a == pytest.approx(b, rel=1e-6)
  res = trainer.fit(TrainConfig(**{**base, "steps": 6, "allow_schedule_change": True}), **kw)
  assert res.resumed_from == 4 and res.step == 6


def test_metrics_leave_the_device_once_per_log_window(tmp_path, monkeypatch):
  import jax
  from minitron_jax.distill import losses as distill
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tp, tcfg, sp, scfg, stream = tiny_problem()
  fetches, real_get = [], jax.device_get

  def counting_get(x):  # counts transfers of step metrics (not checkpoint or eval traffic)
    if "train/lr" in str(jax.tree_util.tree_structure(x)):
      fetches.append(len(x) if isinstance(x, list) else 1)
    return real_get(x)

  monkeypatch.setattr(jax, "device_get", counting_get)
  runs = {}
  for log_every in (1, 3):
    fetches.clear()
    lines = []
    cfg = TrainConfig(steps=7, global_batch_size=4, seq_len=32, lr=1e-3, warmup_steps=1,
                      dtype="float32", save_every=0, log_every=log_every)
    out = tmp_path / str(log_every)
    res = trainer.fit(cfg, model_params=sp, model_cfg=scfg, train_tokens=stream,
                      output_dir=str(out), teacher_params=tp, teacher_cfg=tcfg,
                      dcfg=distill.DistillConfig(hidden_loss="cosine", layer_map=(1,)),
                      log=lines.append)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in res.history] == list(range(1, 8))
    assert res.tokens == sum(r["train/tokens"] for r in rows) and res.seconds > 0
    progress = [line for line in lines if line.startswith("step ")]
    assert all("tok/s" in line and "ETA" in line for line in progress)
    runs[log_every] = (list(fetches), [line.split(" |")[0] for line in progress], res.history)
  assert runs[1][0] == [1] * 7
  # The first step, then every third, then the end: four transfers for seven updates.
  assert runs[3][0] == [1, 2, 3, 1], runs[3][0]
  assert runs[3][1] == ["step 1/7", "step 3/7", "step 6/7", "step 7/7"]
  for a, b in zip(runs[1][2], runs[3][2]):
    assert a == b  # fetching later changes no number


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, real_dir):
  """Tiny random HF teacher (with the real tokenizer) and a narrower student without one."""
  from helpers import make_hf_llama

  root = tmp_path_factory.mktemp("models")
  _, teacher = make_hf_llama(root / "teacher", vocab=49152, hidden=64, inter=96, layers=2,
                             heads=4, kv_heads=2, max_pos=512)
  _, student = make_hf_llama(root / "student", vocab=49152, hidden=32, inter=48, layers=1,
                             heads=4, kv_heads=2, max_pos=512, seed=1)
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(real_dir, f)):
      shutil.copy(os.path.join(real_dir, f), teacher)
  # As pruning leaves it: the layer map and the projection's start are read from here.
  with open(os.path.join(student, "prune_report.json"), "w") as f:
    json.dump({"kept": {"embed": list(range(0, 64, 2)), "mlp": None, "layers": [1]}}, f)
  return teacher, student


def _cli(*args, wait=True):
  cmd = [sys.executable, os.path.join(ROOT, "launch", "distill.py"), *args]
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                       env=_env(1))
  if not wait:
    return p
  out, err = p.communicate(timeout=TIMEOUT_S)
  return p.returncode, out, err


def _finish(p):
  try:
    out, err = p.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    p.kill()
    raise
  return p.returncode, out, err


def test_resume_after_sigkill_is_exact(tiny_dirs, tmp_path):
  from minitron_jax.distill import metrics
  from minitron_jax.io import hf as hf_io

  teacher, student = tiny_dirs
  common = [f"--teacher_dir={teacher}", f"--student_dir={student}", "--steps=6",
            "--global_batch_size=4", "--micro_batch_size=2", "--seq_len=64", "--lr=1e-3",
            "--warmup_steps=2", "--save_every=2", "--eval_every=3", "--eval_windows=2",
            "--hidden_loss=cosine", "--dtype=float32", "--log_every=1"]
  full, crashed = tmp_path / "full", tmp_path / "crashed"
  p_full = _cli(*common, f"--output_dir={full}", wait=False)
  crash = subprocess.run(
      [sys.executable, os.path.abspath(__file__),
       json.dumps({"args": [*common, f"--output_dir={crashed}"], "kill_after_save": 4})],
      env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert crash.returncode == -signal.SIGKILL, crash.stderr
  assert sorted(os.listdir(crashed / "checkpoints")) >= ["2", "4"]
  assert not (crashed / "hf").exists()
  rc, out, err = _cli(*common, f"--output_dir={crashed}")
  assert rc == 0, err
  assert files.read_json(crashed / "run.json")["resumed_from"] == 4
  rc, out_full, err = _finish(p_full)
  assert rc == 0, err

  rows = {name: metrics.read_metrics(str(tmp_path / name / "metrics.jsonl"))
          for name in ("full", "crashed")}
  assert [r["step"] for r in rows["full"]] == [r["step"] for r in rows["crashed"]]
  for a, b in zip(rows["full"], rows["crashed"]):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["step"], k)
  assert any("eval/ppl" in r for r in rows["full"])
  pa, cfg_a = hf_io.load_hf(full / "hf")
  pb, cfg_b = hf_io.load_hf(crashed / "hf")
  assert cfg_a == cfg_b and cfg_a.hidden_size == 32
  import jax
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  ps, _ = hf_io.load_hf(student)
  assert any(not np.allclose(x, y) for x, y in zip(jax.tree_util.tree_leaves(pa),
                                                   jax.tree_util.tree_leaves(ps)))
  assert (full / "losses.png").stat().st_size > 1000
  assert (full / "hf" / "tokenizer.json").exists()
  run = files.read_json(full / "run.json")
  assert run["steps"] == 6 and run["evals"][-1]["step"] == 6
  assert run["prune_report"].endswith("prune_report.json")
  assert run["distill_config"]["layer_map"] == [1]


@pytest.mark.parametrize("args,culprit", [
    (["--kd_temperature=0"], "temperature"),
    (["--global_batch_size=8", "--micro_batch_size=3"], "micro_batch_size"),
    (["--mesh=data:3"], "--mesh"),
    (["--layer_map=0,1", "--hidden_loss=cosine"], "layer map"),
    (["--hidden_loss=l2"], "hidden_loss"),
    (["--student_dir=/nonexistent/student"], "/nonexistent/student"),
    (["--qad_format=gguf_q4_0"], "--qad_format: gguf_q4_0 is quantized on the host"),
    (["--qad_format=int4_nope"], "--qad_format"),
    (["--qad_format=fp8"], "use fp8_channel"),  # the student's 32 dims: no whole 128-blocks
    (["--qad_method=gptq"], "--qad_format is required"),
    (["--steps=0"], "--steps"),
    (["--lr=0"], "--lr"),
    (["--cache_teacher_topk=4"], "--teacher_cache is required"),
    (["--teacher_cache=x", "--hidden_loss=cosine"], "--hidden_loss"),
    (["--qad_format=int4", "--qad_calib_data=shakespeare"], "--qad_calib_data is for a"),
    (["--qad_format=int8", "--qad_method=awq"], "--qad_method=awq cannot quantize int8"),
    (["--lora_rank=4", "--lora_targets=q,qkv"], "--lora_targets"),
])
def test_bad_flags_are_one_line_errors(tiny_dirs, tmp_path, args, culprit):
  teacher, student = tiny_dirs
  base = [f"--teacher_dir={teacher}", f"--output_dir={tmp_path / 'out'}", "--steps=1",
          "--seq_len=16"]
  if not any(a.startswith("--student_dir") for a in args):
    base.append(f"--student_dir={student}")
  rc, _, err = _cli(*base, *args)
  assert rc != 0
  lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
  assert lines and culprit in lines[0], err
  assert "Traceback" not in err
  assert not (tmp_path / "out" / "hf").exists()


def test_qad_exports_the_quantized_student(tiny_dirs, tmp_path):
  import jax
  from minitron_jax.io import hf as hf_io
  from minitron_jax.quantize import formats as Q

  teacher, student = tiny_dirs
  out = tmp_path / "qad"
  rc, stdout, err = _cli(f"--teacher_dir={teacher}", f"--student_dir={student}",
                         f"--output_dir={out}", "--steps=2", "--global_batch_size=2",
                         "--seq_len=32", "--warmup_steps=0", "--eval_every=0",
                         "--dtype=float32", "--qad_format=int4", "--qad_group_size=16")
  assert rc == 0, err
  assert "int4, rtn" in stdout
  report = files.read_json(out / "quantized" / "quantize_report.json")
  assert report["format"] == "int4" and report["method"] == "rtn"
  # The quantized export is the trained float32 weights in the format trained for.
  trained, cfg = hf_io.load_hf(out / "hf")
  assert jax.tree_util.tree_leaves(trained)[0].dtype == np.float32
  from safetensors import safe_open
  from minitron_jax.quantize import export as quant_export
  want = Q.quantize_params(trained, cfg, Q.QuantFormat.INT4_GROUP, group_size=16)
  with safe_open(str(out / "quantized" / "model.safetensors"), "np") as f:
    got = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
  np.testing.assert_array_equal(
      got, quant_export.pack_int32(np.asarray(want["layers"]["up"].values[0]), 4))


def test_qad_from_a_calibrated_grid_exports_on_that_grid(tiny_dirs, tmp_path):
  """--qad_method=gptq: the export is the trained weights encoded on the GPTQ model's own grid
  (computed here independently on the same calibration windows), not on a re-derived one."""
  import jax
  from safetensors import safe_open
  from minitron_jax.data import corpus, packing
  from minitron_jax.io import hf as hf_io
  from minitron_jax.quantize import calibrate, qad
  from minitron_jax.quantize import export as quant_export
  from minitron_jax.quantize import formats as Q

  teacher, student = tiny_dirs
  out = tmp_path / "qad"
  rc, stdout, err = _cli(f"--teacher_dir={teacher}", f"--student_dir={student}",
                         f"--output_dir={out}", "--steps=2", "--global_batch_size=2",
                         "--seq_len=32", "--warmup_steps=0", "--eval_every=0", "--lr=1e-2",
                         "--dtype=float32", "--qad_format=int4_asym", "--qad_group_size=16",
                         "--qad_method=gptq", "--qad_calib_samples=2", "--qad_calib_seq_len=32")
  assert rc == 0, err
  assert files.read_json(out / "quantized" / "quantize_report.json")["method"] == "frozen_grid"
  fmt = Q.QuantFormat.INT4_GROUP_ASYM
  params, cfg = hf_io.load_hf(student)
  tok = hf_io.load_tokenizer(teacher)
  batches = list(packing.calibration_batches(corpus.load_tokens("shakespeare", tok),
                                             num_samples=2, seq_len=32, batch_size=8))
  grid = qad.FrozenGrid(calibrate.calibrated_params(params, cfg, fmt, batches, "gptq",
                                                    group_size=16), cfg)
  trained, _ = hf_io.load_hf(out / "hf")
  want = quant_export.export(quant_export.export_params(grid.encode(trained), cfg, fmt), cfg,
                             fmt, str(tmp_path / "want"))
  rederived = Q.quantize_params(trained, cfg, fmt, group_size=16)["layers"]["up"].scale
  with safe_open(str(out / "quantized" / "model.safetensors"), "np") as f, \
       safe_open(os.path.join(want, "model.safetensors"), "np") as g:
    assert sorted(f.keys()) == sorted(g.keys())
    for k in f.keys():
      np.testing.assert_array_equal(f.get_tensor(k), g.get_tensor(k), err_msg=k)
    scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale").astype(np.float32)
  assert not np.allclose(scale, np.asarray(rederived[0], np.float32))
  moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
           zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(grid.start_params()))]
  assert max(moved) > 0  # it trained


def test_teacher_correction_writes_an_hf_directory(tiny_dirs, tmp_path):
  import jax
  from minitron_jax.io import hf as hf_io
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  teacher, _ = tiny_dirs
  cfg = TrainConfig(mode="teacher_correction", steps=4, global_batch_size=4, seq_len=64,
                    lr=1e-3, warmup_steps=1, dtype="float32", save_every=0, eval_every=4,
                    eval_windows=2, log_every=100)
  summary = trainer.run(trainer.DistillJob(output_dir=str(tmp_path), teacher_dir=teacher,
                                           train=cfg))
  assert summary["evals"][-1]["eval/loss"] < summary["evals"][0]["eval/loss"]
  new, new_cfg = hf_io.load_hf(tmp_path / "hf")
  old, old_cfg = hf_io.load_hf(teacher)
  assert new_cfg == old_cfg
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old))]
  assert max(diffs) > 1e-4
  assert (tmp_path / "hf" / "tokenizer.json").exists()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert all("train/ce" in r for r in rows if "train/lr" in r)


# ---------------------------------------------------------------------------- the real teacher


def halve_width(params, cfg, hidden, mlp):
  """A crude width-pruned student: the first `hidden` embedding channels and `mlp` neurons."""
  import jax
  from minitron_jax import axes

  keep = {axes.EMBED: hidden, axes.MLP: mlp}
  leaves = []
  for spec in axes.param_specs(cfg):
    x = np.asarray(jax.device_get(axes.get(params, spec)))
    for i, name in enumerate(spec.axes):
      if name in keep:
        x = np.take(x, np.arange(keep[name]), axis=i)
    leaves.append((spec, x))
  return axes.tree_from_leaves(leaves), cfg.replace(hidden_size=hidden, intermediate_size=mlp)


@pytest.mark.slow
def test_distillation_recovers_a_width_pruned_smollm2(real_model, data_root, tmp_path):
  from minitron_jax.data import corpus as data
  from minitron_jax.distill import losses as distill
  from minitron_jax.evaluate import scoring as evaluate
  from minitron_jax.distill import run as trainer
  from minitron_jax.distill.step import TrainConfig

  tparams, tcfg, tok = real_model
  sparams, scfg = halve_width(tparams, tcfg, 432, 768)
  with open(os.path.join(data_root, "wikitext-2", "valid.txt"), encoding="utf-8") as f:
    ids = tok(f.read()[:200_000], add_special_tokens=False, verbose=False)["input_ids"]

  def ppl(params, cfg):
    return evaluate.perplexity(params, cfg, ids, seq_len=256, max_windows=8, batch_size=8,
                               progress=False)["ppl"]

  before = ppl(sparams, scfg)
  stream = data.load_tokens("shakespeare", tok)
  # float32: on CPU it is as fast as bfloat16 (the bf16 path is covered by the tiny tests).
  cfg = TrainConfig(steps=30, global_batch_size=4, seq_len=128, lr=5e-4, min_lr=5e-5,
                    warmup_steps=3, dtype="float32", save_every=0, log_every=10)
  t0 = time.time()
  res = trainer.fit(cfg, model_params=sparams, model_cfg=scfg, train_tokens=stream,
                    output_dir=str(tmp_path), teacher_params=tparams, teacher_cfg=tcfg,
                    dcfg=distill.DistillConfig(), pad_id=tok.eos_token_id)
  after = ppl(res.params, scfg)
  teacher = ppl(tparams, tcfg)
  print(f"\nWikiText-2 valid ppl (8 x 256 tokens): teacher {teacher:.1f}, pruned student "
        f"{before:.1f}, distilled {after:.1f} after {res.step} steps, {res.tokens} tokens, "
        f"{time.time() - t0:.0f}s")
  assert after < before / 3, (before, after)
  kl = [r["distill/kl"] for r in res.history]
  assert np.mean(kl[-5:]) < 0.5 * np.mean(kl[:5])


if __name__ == "__main__":
  spec = json.loads(sys.argv[1])
  if "args" in spec:
    killing_worker(spec)
  elif "steps" in spec:
    preempt_worker(spec)
  else:
    worker(spec)
