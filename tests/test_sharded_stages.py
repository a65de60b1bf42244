"""Every stage besides training on a device mesh: importance (activation, Taylor), layer
importance, perplexity, zero-shot scoring, generation and quantization (calibration and the
quantized params) give the single-device results on 8 forced CPU devices; so does the
recipe's evaluate stage, which runs on the recipe's `mesh`.

The stages run in one subprocess (this file doubles as its worker script) because the number of
forced CPU devices must be set before jax is imported. Batches have row counts that do not
divide the batch shards, so the padding rows must count for nothing.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("data:2,fsdp:2,tensor:2", "fsdp:8")
TOL = 1e-5


def _results(mesh_spec: str | None) -> dict[str, np.ndarray]:
  """Every stage's numbers on one mesh (None: plain arrays on one device)."""
  import jax
  from minitron_jax import axes, config, sharding
  from minitron_jax.evaluate import generate as G
  from minitron_jax.evaluate import scoring
  from minitron_jax.prune import importance as I
  from minitron_jax.prune import layer_importance as LI
  from minitron_jax.quantize import formats as Q

  cfg = config.preset("tiny", num_hidden_layers=3)
  rng = np.random.default_rng(0)
  params = axes.tree_from_leaves(
      (s, (1.0 + 0.1 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32)
       if s.path[-1].endswith("norm") else
       (0.1 * rng.standard_normal(axes.shape(s, cfg))).astype(np.float32))
      for s in axes.param_specs(cfg))
  batches = [rng.integers(3, cfg.vocab_size, (b, 24)).astype(np.int32) for b in (5, 3)]
  mesh = sharding.stage_mesh(mesh_spec)
  out = {}
  for agg in ("l2,mean", "var,l2"):
    s = I.activation_scores(params, cfg, batches, I.Aggregation.parse(agg), mesh=mesh)
    out.update(s.to_npz_dict(f"activation[{agg}]/"))
  out.update(I.taylor_scores(params, cfg, batches, mesh=mesh).to_npz_dict("taylor/"))
  for k, v in LI.block_importance(params, cfg, batches, (1, 2), mesh=mesh).items():
    out[f"block_importance/{k}"] = v
  base, drop = LI.lm_loss_drop(params, cfg, batches, (1, 2), mesh=mesh)
  out["lm_loss/base"] = np.float64(base)
  for k, v in drop.items():
    out[f"lm_loss/{k}"] = v
  ids = rng.integers(3, cfg.vocab_size, 7 * 32 + 5)
  ppl = scoring.perplexity(params, cfg, ids, seq_len=32, batch_size=3, progress=False,
                           mesh=mesh)
  out["ppl/window_nll"] = np.array(ppl["window_nll"])
  pairs = [(list(rng.integers(3, 200, n)), list(rng.integers(3, 200, m)))
           for n, m in ((5, 2), (9, 1), (3, 4), (12, 3), (1, 1))]
  lls, greedy = scoring.loglikelihoods(params, cfg, pairs, batch_size=3, mesh=mesh)
  out["loglik/ll"], out["loglik/greedy"] = lls, greedy.astype(np.float64)
  prompts = [list(rng.integers(3, 200, n)) for n in (4, 9, 6)]
  gen = G.generate(params, cfg, prompts, G.SamplingConfig(max_new_tokens=6),
                   stop_at_eos=False, mesh=mesh)
  out["generate/tokens"] = np.array(gen.tokens, np.float64)
  act = Q.calibrate_activation_scales(params, cfg, batches, mesh=mesh)
  for k, v in act.items():
    out[f"fp8_scales/{k}"] = np.asarray(jax.device_get(v))
  placed = params if mesh is None else sharding.shard_params(params, cfg, mesh)
  q = Q.quantize_params(placed, cfg, "int8_channel")
  for spec, leaf in axes.iter_leaves(q, cfg):
    if Q.is_quantized(leaf):
      out[f"int8/{spec.name}/values"] = np.asarray(leaf.values, np.float64)
      out[f"int8/{spec.name}/scale"] = np.asarray(leaf.scale, np.float64)
  if mesh_spec in (None, MESHES[0]):  # the plumbing of one mesh; the numbers are above
    out.update(_recipe_evaluation(mesh_spec))
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _recipe_evaluation(mesh_spec: str | None) -> dict[str, np.ndarray]:
  """The recipe's evaluation of a model (perplexity, held-out perplexity, generation) with the
  recipe's `mesh` set to `mesh_spec` (None: the default `data:-1`, one device)."""
  import tempfile

  from configs import tiny
  from minitron_jax.evaluate import generate as G
  from minitron_jax.evaluate import scoring
  from minitron_jax.io import files, registry
  from minitron_jax.recipe import report

  cfg = tiny.get_config()
  cfg.mesh = mesh_spec or "data:-1"
  text = " ".join(f"The {w} of the {v} is {n}." for n, (w, v) in enumerate(
      zip(["king", "house", "river", "song"] * 40, ["city", "field", "sea", "day"] * 40)))
  with tempfile.TemporaryDirectory(prefix="recipe_eval_") as run_dir:
    cfg.eval.tasks, cfg.eval.ppl_file = ("ppl",), os.path.join(run_dir, "text.txt")
    files.write_text(cfg.eval.ppl_file, text)
    files.write_text(os.path.join(run_dir, "data", "heldout.jsonl"),
                     json.dumps({"text": text[::-1]}) + "\n")
    files.write_json(os.path.join(run_dir, "teacher.json"), {
        "model_dir": str(registry.resolve_model_dir("smollm2-tiny-random"))})
    seen = []  # the mesh each evaluation function was given

    def spy(fn):
      def wrapped(*a, **kw):
        seen.append(kw.get("mesh"))
        return fn(*a, **kw)
      return wrapped
    originals = scoring.run_evaluation, scoring.perplexity, G.generate
    scoring.run_evaluation, scoring.perplexity, G.generate = map(spy, originals)
    try:
      got = report.evaluate_model(cfg, run_dir, "teacher", data_root=None)
    finally:
      scoring.run_evaluation, scoring.perplexity, G.generate = originals
  sizes = {0 if m is None else m.size for m in seen}
  assert sizes == {8 if mesh_spec else 0}, (mesh_spec, sizes)
  return {"recipe/ppl_window_nll": np.array(got["results"]["ppl"]["window_nll"]),
          "recipe/heldout_window_nll": np.array(got["results"]["heldout_ppl"]["window_nll"]),
          "recipe/samples": np.array([[ord(c) for c in "|".join(got["samples"])]])}


def worker(out_dir: str) -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  for name, spec in [("one", None)] + [(m, m) for m in MESHES]:
    np.savez(os.path.join(out_dir, f"{name.replace(':', '_').replace(',', '-')}.npz"),
             **_results(spec))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sharded_stages"))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(out)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=1200)
  if proc.returncode:
    pytest.fail(f"worker failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-4000:]}")
  return {f[:-4]: dict(np.load(os.path.join(out, f))) for f in os.listdir(out)}


@pytest.mark.parametrize("mesh", MESHES)
def test_every_stage_on_a_mesh_equals_one_device(results, mesh):
  one, sharded = results["one"], results[mesh.replace(":", "_").replace(",", "-")]
  recipe = {k for k in one if k.startswith("recipe/")}
  assert recipe and set(one) == set(sharded) | (recipe if mesh != MESHES[0] else set())
  # Every stage is there, and the numbers are not trivially equal (e.g. all zeros).
  for stage in ("activation[var,l2]/heads", "taylor/channels", "block_importance/2",
                "lm_loss/2", "ppl/window_nll", "loglik/ll", "generate/tokens",
                "fp8_scales/mlp_act", "int8/layers/down/values", "recipe/ppl_window_nll",
                "recipe/heldout_window_nll", "recipe/samples"):
    assert stage in one and np.ptp(one[stage]) > 0, stage
  for k in sharded:
    np.testing.assert_allclose(sharded[k], one[k], rtol=TOL, atol=TOL, err_msg=k)


if __name__ == "__main__":
  worker(json.loads(sys.argv[1]))
