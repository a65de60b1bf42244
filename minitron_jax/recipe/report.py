"""Per-model evaluation and the run report (report.md, PNGs) of a recipe run."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import numpy as np

from minitron_jax import plots, sharding
from minitron_jax.evaluate import stats
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.recipe import layout

LABELS = {"teacher": "teacher", "corrected": "corrected teacher",
          "pruned_width": "pruned, width", "pruned_depth": "pruned, depth",
          "distill_width": "distilled, width", "distill_depth": "distilled, depth",
          "baseline_pruned_ce": "baseline: pruned width + CE (no teacher)",
          "baseline_random_ce": "baseline: random init + CE",
          "pruned_search": "pruned, searched shape", "distill_search": "distilled, searched shape",
          "sparse": "sparsified (sparsify stage)"}
# Closed-book QA (`eval.qa_task`) comes last, as exact match ("EM") of greedy answers.
QA_COLUMNS = ("triviaqa", "nq_open")
TASK_COLUMNS = ("mmlu", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
                "openbookqa") + QA_COLUMNS
TRAINED = ("corrected", "distill_width", "distill_depth", "distill_search",
           "baseline_pruned_ce", "baseline_random_ce")


def label(name: str, quant_source: str = "") -> str:
  if name.startswith("quantized/"):
    return f"{LABELS.get(quant_source, quant_source)}, {name.split('/', 1)[1]}".lstrip(", ")
  return LABELS.get(name, name)


def load_for_eval(cfg, run_dir: str, name: str):
  """(params, model cfg, tokenizer, weights dir) of a model of the run; quantized models run
  on quantized params (dequantized inside the matmuls)."""
  if name.startswith("quantized/"):
    from minitron_jax.quantize import formats as quantize

    fmt = name.split("/", 1)[1]
    params, mcfg, tok, _ = hf_io.load_model(layout.model_dir(run_dir, cfg.quantize.source),
                                          cfg.dtype)
    from minitron_jax.quantize.export import export_format, export_params
    q = export_format(fmt)
    # Exactly the exported weights: quantized leaves, the rest in the export's dtype.
    return (export_params(quantize.quantize_params(params, mcfg, q), mcfg, q), mcfg, tok,
            os.path.join(run_dir, name))
  path = layout.model_dir(run_dir, name)
  params, mcfg, _, _ = hf_io.load_model(path, cfg.dtype, with_tokenizer=False)
  tok = hf_io.load_tokenizer(layout.model_dir(run_dir, "teacher"))
  return params, mcfg, tok, path


def model_tasks(cfg, name: str) -> list[str]:
  """All of `eval.tasks` for the models the report compares (the teacher the students come
  from, distilled students, baselines); only those also in `eval.reference_tasks` for the
  others (the teacher before correction, one-shot pruned and quantized models), whose zero-shot
  scores sit at chance or within noise of their source's. () = every task for every model."""
  ref = tuple(cfg.eval.reference_tasks)
  return [t for t in cfg.eval.tasks if not (ref and is_reference(cfg, name)) or t in ref]


def is_reference(cfg, name: str) -> bool:
  """Whether the report only sets `name` beside its source (the teacher before correction,
  one-shot pruned, quantized and sparse models) rather than comparing it."""
  return (name.startswith(("quantized/", "pruned_")) or name == "sparse"
          or (name == "teacher" and layout.students_teacher(cfg) != "teacher"))


def evaluate_model(cfg, run_dir: str, name: str, data_root: str | None) -> dict:
  """Every measurement of one model of the run: `eval.tasks` (`model_tasks`), held-out
  perplexity, greedy samples of `generate.prompts` and decode speed. `data_root`: where the
  evaluation data is (the config's `data_root` when None)."""
  from minitron_jax.evaluate import generate as G
  from minitron_jax.evaluate import run as eval_run
  from minitron_jax.recipe import jobs

  params, mcfg, tok, path = load_for_eval(cfg, run_dir, name)
  job = jobs.eval_job(cfg, path, model_tasks(cfg, name),
                      reference=bool(cfg.eval.reference_tasks) and is_reference(cfg, name))
  if data_root is not None:
    job = dataclasses.replace(job, data_root=data_root)
  mesh = job.mesh.stage_mesh()
  if mesh is not None:  # placed once: every call below keeps leaves already laid out so
    params = sharding.shard_params(params, mcfg, mesh)
  e = cfg.eval
  # The run refused to start without this data (stages.run), so none of it is skipped here.
  res = eval_run.evaluate_params(job, params, mcfg, tok, mesh)
  held = heldout_ppl(params, mcfg, tok, run_dir, e, mesh)
  if held is not None:
    res["heldout_ppl"] = held
  g = cfg.generate
  # The chat template with add_generation_prompt=True, as the instruct teacher was trained.
  prompts = [G.encode_prompt(tok, p, chat=g.chat) for p in g.prompts]
  gen = G.generate(params, mcfg, prompts, G.SamplingConfig(max_new_tokens=g.max_new_tokens),
                   eos_ids=G.eos_ids(mcfg, tok), mesh=mesh)
  tokens = [list(map(int, t)) for t in gen.tokens]
  return {"name": name, "label": label(name, cfg.quantize.source), "params": mcfg.num_params(),
          "size_bytes": files.weight_bytes(path, skip=("checkpoints", "init")), "results": res,
          "decode_tokens_per_second": G.decode_speed(params, mcfg, prompts[:1],
                                                     e.decode_tokens, mesh=mesh),
          "samples": [tok.decode(t, skip_special_tokens=True) for t in tokens],
          "repetition": [stats.repeated_ngram_fraction(t, 3) for t in tokens]}


def heldout_ppl(params, mcfg, tok, run_dir: str, e, mesh=None) -> dict | None:
  """Perplexity on the held-out slice of the training sources (documents EOS-separated, as in
  training), or None when the run has no held-out slice."""
  from minitron_jax.data import corpus
  from minitron_jax.evaluate import scoring

  path = os.path.join(run_dir, "data", "heldout.jsonl")
  if not os.path.isfile(path) or os.path.getsize(path) == 0:
    return None
  ids = corpus.tokenize_documents(corpus.load_texts(path), tok).tokens
  if len(ids) < e.seq_len:
    return None
  res = scoring.perplexity(params, mcfg, ids, seq_len=e.seq_len,
                           max_windows=e.max_windows or None,
                           batch_size=max(1, e.batch_size // 4), progress=False, mesh=mesh)
  return {**res, "file": path}


def _fmt(v, kind="f"):
  if v is None:
    return "–"
  if kind == "pct":
    return f"{100 * v:.1f}"
  if kind == "int":
    return f"{v / 1e6:.1f}M"
  if kind == "mb":
    return f"{v / 2**20:.0f}"
  return f"{v:.2f}"


def _acc(r: dict) -> tuple[float, float, int] | None:
  """(accuracy, its standard error, examples) of a task result: acc_norm where defined, exact
  match for closed-book QA."""
  if "acc" not in r and "exact_match" not in r:
    return None
  key = "exact_match" if "exact_match" in r else "acc_norm" if "acc_norm" in r else "acc"
  n = int(r.get("examples", 0))
  se = r.get(f"{key}_stderr")
  return r[key], stats.stderr(r[key], n) if se is None else se, n


def results_table(evals: list[dict]) -> str:
  tasks = [t for t in TASK_COLUMNS if any(t in e["results"] for e in evals)]
  held = any("heldout_ppl" in e["results"] for e in evals)
  counts = {t: max((e["results"].get(t, {}).get("examples", 0) for e in evals), default=0)
            for t in tasks}
  shots = {t: max((e["results"].get(t, {}).get("num_fewshot", 0) for e in evals), default=0)
           for t in tasks}
  names = {t: f"{t} EM" if t in QA_COLUMNS else t for t in tasks}
  head = (["model", "params", "size (MiB)", "WikiText-2 ppl"]
          + (["held-out ppl"] if held else [])
          + [f"{names[t]} ({shots[t]}-shot, n={counts[t]})" if shots[t] else
             f"{names[t]} (n={counts[t]})" for t in tasks] + ["repeated 3-grams", "decode tok/s"])
  rows = []
  for e in evals:
    r = e["results"]
    cells = []
    for t in tasks:
      a = _acc(r.get(t, {}))
      cells.append("–" if a is None else f"{100 * a[0]:.1f} ± {100 * a[1]:.1f}")
    rep = e.get("repetition")
    rows.append([e["label"], _fmt(e["params"], "int"), _fmt(e["size_bytes"], "mb"),
                 _fmt(r.get("ppl", {}).get("ppl"))]
                + ([_fmt(r.get("heldout_ppl", {}).get("ppl"))] if held else [])
                + cells
                + [_fmt(float(np.mean(rep)) if rep else None, "pct"),
                   _fmt(e["decode_tokens_per_second"])])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _result(evals, name):
  return next((e["results"] for e in evals if e["name"] == name), None)


def _ppl(evals, name, key="ppl"):
  r = _result(evals, name)
  return None if r is None else r.get(key, {}).get("ppl")


def compare_ppl(ra: dict, rb: dict, la: str, lb: str) -> str | None:
  """One clause comparing two models' perplexity on the same windows: the winner when the
  paired per-window difference of log-perplexity exceeds two standard errors, else "within
  noise"; always the ratio and the window count."""
  if not ra or not rb or "ppl" not in ra or "ppl" not in rb:
    return None
  wa, wb = ra.get("window_nll"), rb.get("window_nll")
  pa, pb = ra["ppl"], rb["ppl"]
  ratio = max(pa, pb) / min(pa, pb)
  if wa and wb and len(wa) == len(wb):
    diff, se = stats.paired_difference(wa, wb)
    n = len(wa)
  else:  # no per-window numbers (an old eval file): no evidence beyond the point values
    diff, se, n = math.log(pa / pb), math.inf, ra.get("windows", 0)
  span = f"{pa:.2f} vs {pb:.2f}, {ratio:.2f}x, {n} windows"
  if not stats.significant(diff, se):
    return f"within noise ({span}; log-ppl difference {diff:+.3f} ± {se:.3f})"
  win = la if diff < 0 else lb
  return f"**{win}** wins ({span}; log-ppl difference {diff:+.3f} ± {se:.3f})"


def compare_tasks(ra: dict, rb: dict, la: str, lb: str) -> str | None:
  """One clause over the zero-shot tasks: per task the leader when the accuracy difference
  exceeds two standard errors (sqrt(se_a² + se_b²)), else "within noise"."""
  parts = []
  for t in TASK_COLUMNS:
    a, b = _acc(ra.get(t, {})), _acc(rb.get(t, {}))
    if a is None or b is None:
      continue
    diff, se = a[0] - b[0], math.hypot(a[1], b[1])
    what = (f"{t} within noise ({100 * diff:+.1f} ± {100 * se:.1f} points)"
            if not stats.significant(diff, se) else
            f"{t}: **{la if diff > 0 else lb}** ({100 * diff:+.1f} ± {100 * se:.1f} points)")
    parts.append(what)
  return "; ".join(parts) or None


def comparisons(evals: list[dict]) -> list[str]:
  """Sentences stating which recipe choice wins, only beyond two standard errors."""
  out = []

  def versus(a, b, what):
    ra, rb = _result(evals, a), _result(evals, b)
    if ra is None or rb is None:
      return
    la, lb = label(a), label(b)
    clauses = [f"WikiText-2: {c}" for c in [compare_ppl(ra.get("ppl"), rb.get("ppl"), la, lb)]
               if c]
    clauses += [f"held-out training data: {c}" for c in
                [compare_ppl(ra.get("heldout_ppl"), rb.get("heldout_ppl"), la, lb)] if c]
    clauses += [f"zero-shot (acc_norm/acc, {la} − {lb}): {c}" for c in
                [compare_tasks(ra, rb, la, lb)] if c]
    if clauses:
      out.append(f"- {what}: " + "; ".join(clauses) + ".")

  versus("distill_width", "baseline_pruned_ce",
         "Distillation against cross-entropy, same pruned student and tokens")
  versus("distill_width", "baseline_random_ce",
         "Pruning + distillation against training from random initialisation, same tokens")
  versus("distill_width", "distill_depth", "Width against depth pruning, both distilled")
  versus("pruned_width", "pruned_depth", "Width against depth pruning, before distillation")
  versus("distill_search", "distill_width", "Searched shape against the hand-set width shape, "
         "both distilled")
  versus("distill_search", "distill_depth", "Searched shape against the hand-set depth shape, "
         "both distilled")
  return out


def recovery(evals: list[dict]) -> list[str]:
  """Per distilled student: the fraction of the teacher-pruned gap (log-perplexity) that
  distillation recovered, against the teacher the students were distilled from."""
  teacher = "corrected" if _result(evals, "corrected") else "teacher"
  out = []
  for kind in ("width", "depth", "search"):
    parts = []
    for key, what in (("ppl", "WikiText-2"), ("heldout_ppl", "held-out training data")):
      pt, pp, pd = (_ppl(evals, n, key) for n in (teacher, f"pruned_{kind}",
                                                   f"distill_{kind}"))
      if None in (pt, pp, pd):
        continue
      g = stats.gap_recovered(pt, pp, pd)
      if g is not None:
        parts.append(f"{what} {100 * g:.0f} % (perplexity {pp:.1f} → {pd:.1f}, "
                     f"{label(teacher)} {pt:.1f}; distilled/teacher {pd / pt:.2f}x)")
    if parts:
      out.append(f"- {label(f'distill_{kind}')}: " + "; ".join(parts) + ".")
  return out


def plot_losses(run_dir: str, names, png: str) -> bool:
  """Training loss and held-out CE of every trained model of the run, in one chart."""
  from minitron_jax.distill.metrics import read_metrics

  curves = []
  for name in names:
    path = os.path.join(run_dir, name, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    rows = read_metrics(path)
    key = "distill/loss" if any("distill/loss" in r for r in rows) else "train/loss"
    curves.append((f"{label(name)} ({key})", [(r["step"], r[key]) for r in rows if key in r],
                   "-", 1.2))
    curves.append((f"{label(name)} held-out CE",
                   [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r], "o--", 0.8))
  return plots.line_chart(curves, png, legend_size=7)


def search_section(run_dir: str) -> list[str]:
  """The architecture search's candidates (prune_search stage), or nothing when it did not run."""
  import json

  path = os.path.join(run_dir, "pruned_search", "search_report.json")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    r = json.load(f)
  lines = ["## Architecture search", "",
           f"{r['candidates_in_budget']} shapes met the budget; the {r['scored']} closest to it "
           f"were pruned one-shot from the same importance and scored on held-out windows, the "
           f"best {r['top_k']} distilled for {r['search_steps']} steps each "
           f"({r['search_tokens_per_candidate']} tokens) and re-ranked. Perplexity on "
           f"{r['held_out']['windows']} held-out windows of {r['held_out']['seq_len']} tokens "
           f"(teacher {math.exp(r['teacher_loss']):.1f}); rank change: one-shot rank minus "
           "rank after the short distillation.", "",
           "| hidden | MLP | heads | KV | layers | params (M) | one-shot ppl | distilled ppl "
           "| rank change | |", "|---|---|---|---|---|---|---|---|---|---|"]
  for c in sorted(r["candidates"], key=lambda c: c["rank_oneshot"]):
    lines.append(f"| {c['hidden_size']} | {c['intermediate_size']} | "
                 f"{c['num_attention_heads']} | {c['num_key_value_heads']} | "
                 f"{c['num_hidden_layers']} | {c['params'] / 1e6:.1f} | {c['oneshot_ppl']:.1f} | "
                 f"{_fmt(c.get('distilled_ppl'))} | {c.get('rank_change', '')} | "
                 f"{'winner' if c['winner'] else ''} |")
  png = os.path.join(run_dir, "pruned_search", "search.png")
  if os.path.isfile(png):
    shutil.copy(png, os.path.join(run_dir, "search.png"))
    lines += ["", "![search](search.png)"]
  return lines + [""]


def _sources(cfg) -> str:
  names = layout.data_sources(cfg)
  weights = tuple(cfg.data.weights or ())
  if len(names) > 1 and weights:
    return ", ".join(f"`{n}` ({w:g})" for n, w in zip(names, weights))
  return ", ".join(f"`{n}`" for n in names)


def write_report(cfg, run_dir: str, names: list[str]) -> str:
  import json

  evals = []
  for name in names:
    with open(os.path.join(run_dir, "eval", f"{name}.json")) as f:
      evals.append(json.load(f))
  lines = [f"# Minitron run: {os.path.basename(cfg.teacher)}", "",
           f"Teacher `{cfg.teacher}`; training data {_sources(cfg)}; "
           f"perplexity on WikiText-2 test and on the held-out slice of the training data "
           f"({cfg.eval.max_windows or 'all'} windows of {cfg.eval.seq_len} tokens each); "
           f"zero-shot accuracy in % ± standard error (acc_norm where defined, first "
           f"{cfg.eval.limit or 'all'} examples per task, n in the header); repeated 3-grams: "
           f"the share of generated 3-grams that repeat an earlier one in the same answer "
           f"(mean over the prompts; loops score near 100).", "", results_table(evals), ""]
  comp = comparisons(evals)
  if comp:
    lines += ["## What wins", "",
              "A difference is stated only beyond two standard errors (perplexity: paired "
              "per-window log-perplexity differences; accuracy: sqrt(se_a² + se_b²)).", ""]
    lines += comp + [""]
  rec = recovery(evals)
  if rec:
    lines += ["## Gap recovered by distillation", "",
              "(log ppl_pruned − log ppl_distilled) / (log ppl_pruned − log ppl_teacher):", ""]
    lines += rec + [""]
  lines += search_section(run_dir)
  if plot_losses(run_dir, TRAINED, os.path.join(run_dir, "loss_curves.png")):
    lines += ["## Training", "", "![loss curves](loss_curves.png)", ""]
  layer_png = os.path.join(run_dir, "pruned_depth", "layer_importance.png")
  if os.path.isfile(layer_png):
    shutil.copy(layer_png, os.path.join(run_dir, "layer_importance.png"))
    lines += ["## Layer importance", "", "![layer importance](layer_importance.png)", ""]
  chat = "through the teacher's chat template" if cfg.generate.chat else "as plain text"
  lines += ["## Generation samples (greedy)", "",
            f"The same prompts for every model, {chat}, {cfg.generate.max_new_tokens} new "
            "tokens at most.", ""]
  for i, prompt in enumerate(cfg.generate.prompts):
    lines += [f"**{prompt}**", "", "| model | completion | repeated 3-grams |", "|---|---|---|"]
    for e in evals:
      text = " ".join(e["samples"][i].split()).replace("|", "\\|")
      rep = e.get("repetition")
      lines.append(f"| {e['label']} | {text[:400]} | "
                   f"{_fmt(rep[i] if rep else None, 'pct')} |")
    lines.append("")
  # report.md marks the stage done, so it is written last.
  files.write_json(os.path.join(run_dir, "report.json"),
                   {"models": evals, "comparisons": comp, "recovery": rec})
  path = os.path.join(run_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  print("\n".join(lines[:len(evals) + 8]))
  return path
