"""Shapes pruning writes that stock transformers 5.x refuses (hidden_size not a multiple of the
head count, explicit head_dim): every launch script runs on them, tokenizers load exactly as
AutoTokenizer loads them, and pruning warns with nearby shapes."""

import contextlib
import io
import math
import os
import shutil
import subprocess
import sys

import jax
import pytest

from minitron_jax import model as M
from minitron_jax.config import LlamaConfig
from minitron_jax.io import files
from minitron_jax.io import hf as hf_io
from minitron_jax.data.calib import CalibSpec
from minitron_jax.prune import run as prune_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The quick brown fox jumps over the lazy dog. Pruning keeps the heads that matter; "
        "distillation repairs what pruning broke. Numbers like 12345 and 678 appear too.\n") * 30
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
# SmolLM2-135M's shape scaled down 8x: 9 query heads in 3 KV groups of head_dim 8.
TEACHER = LlamaConfig(vocab_size=1, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)


def _save_tokenizer(out_dir) -> int:
  """A byte-level BPE tokenizer with ChatML specials and a chat template; returns its size."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([TEXT], trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[0])
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(out_dir)
  return len(fast)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A valid-shape teacher and the student `prune_job.run` makes of it (hidden 64, 6 heads)."""
  root = tmp_path_factory.mktemp("pruned_shapes")
  vocab = _save_tokenizer(root / "tok")
  text = root / "text.txt"
  text.write_text(TEXT)
  cfg = TEACHER.replace(vocab_size=vocab)
  teacher = hf_io.save_hf(M.init_params(cfg, jax.random.key(0), std=0.1), cfg, root / "teacher",
                          source_dir=root / "tok")
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    report = prune_job.run(prune_job.PruneJob(
        model_dir=teacher, output_dir=str(root / "student"), hidden_size=64,
        num_attention_heads=6, intermediate_size=80,
        calib=CalibSpec(data=str(text), samples=4, seq_len=32, batch_size=4), eval_samples=0))
  return {"root": root, "text": str(text), "teacher": teacher, "student": report["output_dir"],
          "report": report, "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def runs(dirs):
  """rc and output of each launch script on the student, started together to share the cores."""
  root, s, text = dirs["root"], dirs["student"], dirs["text"]
  commands = {
      "evaluate": ["evaluate.py", f"--model_dir={s}", "--tasks=ppl", f"--ppl_file={text}",
                   "--seq_len=32", "--max_windows=2", f"--output_json={root / 'eval.json'}"],
      "generate": ["generate.py", f"--model_dir={s}", "--chat", "--prompt=hello",
                   "--max_new_tokens=4"],
      "quantize": ["quantize.py", f"--model_dir={s}", "--format=int8",
                   f"--output_dir={root / 'int8'}", f"--ppl_file={text}", "--seq_len=32",
                   "--max_windows=1"],
      "distill": ["distill.py", f"--teacher_dir={dirs['teacher']}", f"--student_dir={s}",
                  f"--output_dir={root / 'distill'}", f"--data={text}", "--steps=2",
                  "--global_batch_size=2", "--seq_len=32", "--warmup_steps=0", "--eval_every=0",
                  "--save_every=0", "--dtype=float32"],
  }
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = {}
  try:
    for name, (script, *args) in commands.items():
      log = open(root / f"{name}.log", "w+")
      procs[name] = log, subprocess.Popen(
          [sys.executable, os.path.join(ROOT, "launch", script), *args], stdout=log,
          stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    results = {}
    for name, (log, p) in procs.items():
      rc = p.wait(timeout=600)
      log.seek(0)
      results[name] = rc, log.read()
    return results
  finally:
    for log, p in procs.values():
      if p.poll() is None:
        p.kill()
      log.close()


def test_prune_writes_the_shape_and_warns(dirs):
  cfg = files.read_json(os.path.join(dirs["student"], "config.json"))
  assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]) == (64, 6, 8)
  warnings = dirs["report"]["warnings"]
  assert len(warnings) == 1
  assert "hidden_size=64 is not a multiple of num_attention_heads=6" in warnings[0]
  assert "allow_explicit_head_dim()" in warnings[0] and "--hidden_size=60 or 66" in warnings[0]
  assert f"warning: {warnings[0]}" in dirs["stderr"].splitlines()
  saved = files.read_json(os.path.join(dirs["student"], "prune_report.json"))
  assert saved["warnings"] == warnings


def test_evaluate_runs_on_the_pruned_shape(runs, dirs):
  rc, out = runs["evaluate"]
  assert rc == 0, out
  ppl = files.read_json(dirs["root"] / "eval.json")["results"]["ppl"]
  assert ppl["windows"] == 2 and math.isfinite(ppl["ppl"])


def test_generate_runs_on_the_pruned_shape(runs):
  rc, out = runs["generate"]
  assert rc == 0, out
  assert "### hello" in out.splitlines()  # the generation block of the one prompt


def test_quantize_runs_on_the_pruned_shape(runs, dirs):
  rc, out = runs["quantize"]
  assert rc == 0, out
  q = dirs["root"] / "int8"
  assert files.read_json(q / "config.json")["head_dim"] == 8
  assert (q / "quantize_report.json").exists() and (q / "tokenizer.json").exists()


def test_distill_runs_on_the_pruned_shape(runs, dirs):
  rc, out = runs["distill"]
  assert rc == 0, out
  cfg = files.read_json(dirs["root"] / "distill" / "hf" / "config.json")
  assert (cfg["hidden_size"], cfg["num_attention_heads"]) == (64, 6)


def _tokenizer_behaviour(tok) -> dict:
  """What a tokenizer does that the tests compare: ids with and without special tokens, the
  chat template's output, its class and special tokens."""
  texts = ["hello world", "The quick brown fox, 12345!", "<|im_start|>user\nhi<|im_end|>", ""]
  chat = [{"role": "user", "content": "hello"}]
  return {
      "ids": {(text, special): tok(text, add_special_tokens=special)["input_ids"]
              for text in texts for special in (True, False)},
      "chat": tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
      "class": type(tok), "chat_template": tok.chat_template,
      **{attr: getattr(tok, attr) for attr in ("bos_token_id", "eos_token_id", "pad_token_id",
                                               "all_special_tokens")},
  }


def test_tokenizer_of_pruned_shape_equals_autotokenizer(dirs):
  import transformers

  ref = transformers.AutoTokenizer.from_pretrained(dirs["teacher"])  # a valid shape
  want = _tokenizer_behaviour(ref)
  assert _tokenizer_behaviour(hf_io.load_tokenizer(dirs["teacher"])) == want
  assert _tokenizer_behaviour(hf_io.load_tokenizer(dirs["student"])) == want


@pytest.mark.slow
def test_real_tokenizer_with_the_reported_shape(real_dir, tmp_path):
  """The report: SmolLM2-135M pruned to hidden 512 with 6 heads of 64."""
  import transformers

  for f in os.listdir(real_dir):
    if f != "model.safetensors":
      shutil.copy(os.path.join(real_dir, f), tmp_path)
  cfg = files.read_json(tmp_path / "config.json")
  cfg.update(hidden_size=512, num_attention_heads=6, num_key_value_heads=3, head_dim=64)
  files.write_json(str(tmp_path / "config.json"), cfg)
  assert (_tokenizer_behaviour(hf_io.load_tokenizer(str(tmp_path)))
          == _tokenizer_behaviour(transformers.AutoTokenizer.from_pretrained(str(real_dir))))


SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   head_dim=64)


@pytest.mark.parametrize("src,target,hidden,heads", [
    (SMOL, dict(hidden_size=512, num_attention_heads=6), [510, 516], []),
    (SMOL, dict(hidden_size=512), [504, 513], []),
    (SMOL, dict(hidden_size=570), [567, 576], [6]),  # 6 = 3 groups of 2 divides 570
    # Never wider than the source: 66 > 64.
    (SMOL.replace(hidden_size=64, num_attention_heads=6), dict(hidden_size=63), [60], [3]),
])
def test_nearby_valid_shapes(src, target, hidden, heads):
  new = src.replace(**target)
  assert prune_job.nearby_valid_shapes(src, new) == (hidden, heads)
  for d in hidden:
    assert d % new.num_attention_heads == 0
  for n in heads:
    assert new.hidden_size % n == 0 and n % new.num_key_value_heads == 0


def test_warning_names_the_fix_and_the_shapes():
  (w,) = prune_job.compat_warnings(SMOL, SMOL.replace(hidden_size=570))
  assert w.startswith("hidden_size=570 is not a multiple of num_attention_heads=9 "
                      "(head_dim=64 is explicit)")
  assert "transformers 5.x and vLLM refuse" in w
  assert "minitron_jax.io.hf_compat.allow_explicit_head_dim()" in w
  assert w.endswith("or prune to --hidden_size=567 or 576, or --num_attention_heads=6.")
  assert prune_job.compat_warnings(SMOL, SMOL.replace(hidden_size=432)) == []  # 432 = 9 x 48
  assert prune_job.compat_warnings(SMOL, SMOL.replace(num_attention_heads=6)) == []
