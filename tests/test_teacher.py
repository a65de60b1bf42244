"""The real SmolLM2-135M-Instruct teacher against transformers' torch model."""

import math
import os

import jax
import numpy as np
import pytest
import torch

from minitron_jax import model as M
from minitron_jax.evaluate import scoring as E
from minitron_jax.evaluate import generate as G

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wikitext_ids(real_model, data_root):
  _, _, tok = real_model
  with open(os.path.join(data_root, "wikitext-2", "test.txt"), encoding="utf-8") as f:
    text = f.read()[:60_000]
  return tok(text, add_special_tokens=False)["input_ids"]


def test_logits_match_transformers_on_wikitext(real_model, real_torch_model, wikitext_ids):
  params, cfg, _ = real_model
  tokens = np.array([wikitext_ids[:320]])
  ours = np.asarray(jax.jit(lambda p, t: M.forward(p, cfg, t)["logits"])(params, tokens))
  with torch.no_grad():
    ref = real_torch_model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_chat_continuation_matches_transformers(real_model, real_torch_model):
  params, cfg, tok = real_model
  prompt = G.encode_prompt(tok, "What is the capital of France? Answer in one sentence.",
                           chat=True)
  ours = G.generate(params, cfg, [prompt], G.SamplingConfig(max_new_tokens=32),
                    eos_ids=G.eos_ids(cfg, tok)).tokens[0]
  with torch.no_grad():
    ref = real_torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=list(G.eos_ids(cfg, tok)),
                                    pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
  ref = [t for t in ref if t not in G.eos_ids(cfg, tok)]
  assert len(ours) >= 5 and ours == ref, (tok.decode(ours), tok.decode(ref))


def test_perplexity_matches_transformers_protocol(real_model, real_torch_model, wikitext_ids):
  params, cfg, _ = real_model
  seq_len, windows = 256, 6
  ours = E.perplexity(params, cfg, wikitext_ids, seq_len=seq_len, max_windows=windows,
                      batch_size=2, progress=False)
  total, count = 0.0, 0
  for w in range(windows):
    x = torch.tensor([wikitext_ids[w * seq_len:(w + 1) * seq_len]])
    with torch.no_grad():
      out = real_torch_model(x, labels=x)  # HF shifts labels: predicts tokens 1..T-1
    total += out.loss.item() * (seq_len - 1)
    count += seq_len - 1
  ref = math.exp(total / count)
  assert ours["tokens"] == count == windows * (seq_len - 1)
  assert abs(ours["ppl"] - ref) / ref <= 1e-4, (ours["ppl"], ref)
  assert 5 < ours["ppl"] < 100
