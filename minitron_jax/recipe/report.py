"""Per-model evaluation and the run report (report.md, PNGs) of a recipe run."""

from __future__ import annotations

import os
import shutil

import numpy as np

from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.recipe import layout

LABELS = {"teacher": "teacher", "corrected": "corrected teacher",
          "pruned_width": "pruned, width", "pruned_depth": "pruned, depth",
          "distill_width": "distilled, width", "distill_depth": "distilled, depth",
          "baseline_pruned_ce": "baseline: pruned width + CE (no teacher)",
          "baseline_random_ce": "baseline: random init + CE"}
TASK_COLUMNS = ("winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
                "openbookqa")
TRAINED = ("corrected", "distill_width", "distill_depth", "baseline_pruned_ce",
           "baseline_random_ce")


def label(name: str, quant_source: str = "") -> str:
  if name.startswith("quantized/"):
    return f"{LABELS.get(quant_source, quant_source)}, {name.split('/', 1)[1]}".lstrip(", ")
  return LABELS.get(name, name)


def dir_bytes(path: str) -> int:
  """Bytes of the weight files of a model directory."""
  total = 0
  for root, _, names in os.walk(path):
    if os.path.basename(root) in ("checkpoints", "init"):
      continue
    total += sum(os.path.getsize(os.path.join(root, f)) for f in names
                 if f.endswith((".safetensors", ".gguf")))
  return total


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


def decode_rate(params, mcfg, prompt_ids, new_tokens: int = 32) -> float:
  from minitron_jax.evaluate import generate as G

  sampling = G.SamplingConfig(max_new_tokens=new_tokens)
  G.generate(params, mcfg, [prompt_ids], sampling, stop_at_eos=False)  # compile
  return G.generate(params, mcfg, [prompt_ids], sampling, stop_at_eos=False
                    ).decode_tokens_per_second


def evaluate_model(cfg, run_dir: str, name: str, data_root: str) -> dict:
  from minitron_jax.evaluate import scoring as evaluate
  from minitron_jax.evaluate import generate as G

  params, mcfg, tok, path = load_for_eval(cfg, run_dir, name)
  e = cfg.eval
  ppl_file = e.ppl_file or os.path.join(data_root, "wikitext-2", "test.txt")
  tasks = [t for t in e.tasks if t == "ppl" or os.path.isdir(data_root)]
  res = evaluate.run_evaluation(params, mcfg, tok, tasks, data_root=data_root,
                                ppl_file=ppl_file, seq_len=e.seq_len,
                                max_windows=e.max_windows or None, limit=e.limit or None,
                                batch_size=e.batch_size, progress=False)
  g = cfg.generate
  prompts = [G.encode_prompt(tok, p, chat=g.chat) for p in g.prompts]
  gen = G.generate(params, mcfg, prompts, G.SamplingConfig(max_new_tokens=g.max_new_tokens),
                   eos_ids=G.eos_ids(mcfg, tok))
  return {"name": name, "label": label(name, cfg.quantize.source), "params": mcfg.num_params(),
          "size_bytes": dir_bytes(path), "results": res,
          "decode_tokens_per_second": decode_rate(params, mcfg, prompts[0],
                                                  e.get("decode_tokens", 32)),
          "samples": [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]}


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


def results_table(evals: list[dict]) -> str:
  tasks = [t for t in TASK_COLUMNS if any(t in e["results"] for e in evals)]
  head = (["model", "params", "size (MiB)", "WikiText-2 ppl"] + tasks + ["decode tok/s"])
  rows = []
  for e in evals:
    r = e["results"]
    rows.append([e["label"], _fmt(e["params"], "int"), _fmt(e["size_bytes"], "mb"),
                 _fmt(r.get("ppl", {}).get("ppl"))]
                + [_fmt(r.get(t, {}).get("acc_norm", r.get(t, {}).get("acc")), "pct")
                   for t in tasks]
                + [_fmt(e["decode_tokens_per_second"])])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ppl(evals, name):
  e = next((e for e in evals if e["name"] == name), None)
  return None if e is None else e["results"].get("ppl", {}).get("ppl")


def comparisons(evals: list[dict]) -> list[str]:
  """Sentences stating which recipe choice wins and by how much (WikiText-2 perplexity)."""
  out = []

  def versus(a, b, what):
    pa, pb = _ppl(evals, a), _ppl(evals, b)
    if pa is None or pb is None:
      return
    win, lose = (a, b) if pa <= pb else (b, a)
    out.append(f"- {what}: **{label(win)}** wins, perplexity {min(pa, pb):.2f} against "
               f"{max(pa, pb):.2f} ({max(pa, pb) / min(pa, pb):.2f}x).")

  versus("distill_width", "baseline_pruned_ce",
         "Distillation against cross-entropy, same pruned student and tokens")
  versus("distill_width", "baseline_random_ce",
         "Pruning + distillation against training from random initialisation, same tokens")
  versus("distill_width", "distill_depth", "Width against depth pruning, both distilled")
  versus("pruned_width", "pruned_depth", "Width against depth pruning, before distillation")
  return out


def plot_losses(run_dir: str, names, png: str) -> bool:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from minitron_jax.distill.run import read_metrics

  fig, ax = plt.subplots(figsize=(8, 4.5))
  drawn = False
  for name in names:
    path = os.path.join(run_dir, name, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    rows = read_metrics(path)
    key = "distill/loss" if any("distill/loss" in r for r in rows) else "train/loss"
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), label=f"{label(name)} ({key})", lw=1.2)
      drawn = True
    ev = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if ev:
      ax.plot(*zip(*ev), "o--", ms=3, lw=0.8, label=f"{label(name)} held-out CE")
  if drawn:
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
  plt.close(fig)
  return drawn


def write_report(cfg, run_dir: str, names: list[str]) -> str:
  import json

  evals = []
  for name in names:
    with open(os.path.join(run_dir, "eval", f"{name}.json")) as f:
      evals.append(json.load(f))
  lines = [f"# Minitron run: {os.path.basename(cfg.teacher)}", "",
           f"Teacher `{cfg.teacher}`; training data `{cfg.data.source}`; "
           f"perplexity on WikiText-2 test ({cfg.eval.max_windows or 'all'} windows of "
           f"{cfg.eval.seq_len} tokens); zero-shot accuracy in % (acc_norm where defined, "
           f"first {cfg.eval.limit or 'all'} examples per task).", "", results_table(evals), ""]
  comp = comparisons(evals)
  if comp:
    lines += ["## What wins", ""] + comp + [""]
  if plot_losses(run_dir, TRAINED, os.path.join(run_dir, "loss_curves.png")):
    lines += ["## Training", "", "![loss curves](loss_curves.png)", ""]
  layer_png = os.path.join(run_dir, "pruned_depth", "layer_importance.png")
  if os.path.isfile(layer_png):
    shutil.copy(layer_png, os.path.join(run_dir, "layer_importance.png"))
    lines += ["## Layer importance", "", "![layer importance](layer_importance.png)", ""]
  lines += ["## Generation samples (greedy)", ""]
  for i, prompt in enumerate(cfg.generate.prompts):
    lines += [f"**{prompt}**", "", "| model | completion |", "|---|---|"]
    for e in evals:
      text = " ".join(e["samples"][i].split()).replace("|", "\\|")
      lines.append(f"| {e['label']} | {text[:400]} |")
    lines.append("")
  path = os.path.join(run_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  files.write_json(os.path.join(run_dir, "report.json"),
                 {"models": evals, "comparisons": comp})
  print("\n".join(lines[:len(evals) + 8]))
  return path


def missing_values(evals: list[dict]) -> list[str]:
  """(model, column) pairs with no value, for checks."""
  out = []
  for e in evals:
    if e.get("decode_tokens_per_second") is None or not np.isfinite(e["decode_tokens_per_second"]):
      out.append(f"{e['name']}: decode")
    for k, v in e["results"].items():
      if v.get("acc", v.get("ppl")) is None:
        out.append(f"{e['name']}: {k}")
  return out
