"""lm-evaluation-harness backend: our JAX models as the harness's `minitron_jax` model.

``MinitronLM`` answers the harness's three request types with this package's code:
log-likelihoods through the packed, jitted scoring of `scoring.loglikelihoods` (requests
packed several to a row, the LM head on continuation tokens only, requests that share their
input tokens run once), rolling log-likelihoods as the harness's disjoint windows through the
same scoring, and `generate_until` through the KV-cache decoding of `generate.generate`. It
runs on float or quantized params (any leaf with ``dequantize``), sharded over a mesh like the
rest of the evaluation. Tokenization is the harness's own (``TemplateLM``), so requests
split into context and continuation exactly as its ``hf`` backend splits them.

lm-eval is an optional dependency (``pip install -e '.[eval]'``); only this module imports it.
lm-eval 0.4.13 finds models in its own registry only (no plugin entry points), so the model
is registered when this module is imported, and the ``minitron-lm-eval`` command is lm-eval's
own command line with it registered:

  minitron-lm-eval --model minitron_jax --model_args model_dir=DIR,dtype=float32 --tasks T

In Python: ``MinitronLM(model_dir=...)`` or ``MinitronLM(params=..., cfg=..., tokenizer=...)``
passed to ``lm_eval.simple_evaluate(model=...)``.
"""

from __future__ import annotations

import functools

import lm_eval.models  # noqa: F401  (the harness's own models first: its registry is lazy)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from minitron_jax.evaluate import generate, scoring
from minitron_jax.evaluate.qa import all_stopped, cut_at_stop, encode_context

MODEL_NAME = "minitron_jax"
DEFAULT_MAX_GEN_TOKS = 256  # as the harness's hf backend


@register_model(MODEL_NAME)
class MinitronLM(TemplateLM):
  """A Llama-family model in JAX as an lm-evaluation-harness model.

  Args (``--model_args`` on the command line, keywords in Python):
    model_dir: HF directory, known short name or hub id (not with `params`).
    dtype: compute dtype, ``float32`` or ``bfloat16``; ``float64`` (a reference for
      checking float32 rounding) needs ``JAX_ENABLE_X64=1``.
    batch_size: packed rows per scoring call, prompts per generation call.
    max_length: longest input in tokens (default: the model's context length).
    mesh: mesh spec to shard params and rows over (``fsdp:-1``...; empty: one device), or
      a built `jax.sharding.Mesh`.
    params, cfg, tokenizer: an already loaded (possibly quantized) model instead of model_dir.
  """

  def __init__(self, model_dir: str | None = None, dtype: str = "float32",
               batch_size: int | str = 16, max_length: int | None = None, mesh="",
               params=None, cfg=None, tokenizer=None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               **unused):
    super().__init__()
    from minitron_jax.settings import MeshSpec

    if (model_dir is None) == (params is None):
      raise ValueError("minitron_jax: give model_dir, or params with cfg and tokenizer")
    if params is None:
      from minitron_jax.io import hf as hf_io

      params, cfg, tokenizer, model_dir = hf_io.load_model(model_dir, dtype)
    elif cfg is None or tokenizer is None:
      raise ValueError("minitron_jax: params need cfg and tokenizer")
    self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
    self.model_dir = model_dir
    # "auto" and "auto:N" (the harness's batch-size search) fall back to the default.
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
    self._max_length = int(max_length or cfg.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self.mesh = MeshSpec(mesh).stage_mesh() if isinstance(mesh, str) else mesh

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    """As the hf backend: the tokenizer's default special tokens, none if the string already
    starts with BOS."""
    extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    bos = self.tokenizer.bos_token
    if add_special_tokens is None and bos and string.startswith(bos):
      extra = {"add_special_tokens": False}
    ids = list(self.tokenizer.encode(string, **extra))
    left = kwargs.get("left_truncate_len")
    return ids[-left:] if left else ids

  def _scores(self, pairs):
    return scoring.loglikelihoods(self.params, self.cfg, pairs, batch_size=self.batch_size,
                                  max_len=self.max_length, mesh=self.mesh)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    lls, greedy = self._scores([(ctx, cont) for _, ctx, cont in requests])
    out = []
    for (key, _, _), ll, g in zip(requests, lls, greedy):
      out.append((float(ll), bool(g)))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, out[-1])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The harness's rolling windows (disjoint, one token of context) of each whole text,
    summed per text."""
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      rolling = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)
      for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
        windows.append((ctx, cont))
        owner.append(i)
    lls, _ = self._scores(windows) if windows else ([], [])
    totals = [0.0] * len(requests)
    for i, ll in zip(owner, lls):
      totals[i] += float(ll)
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with ``do_sample``) KV-cache decoding, cut at the first stop
    sequence; contexts keep their last ``max_length - max_gen_toks`` tokens."""
    eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    for members in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_new = int(kwargs.pop("max_gen_toks"))
      if max_new >= self.max_length:
        raise ValueError(f"max_gen_toks={max_new} must be below max_length={self.max_length}")
      sampling = generate.SamplingConfig(
          max_new_tokens=max_new,
          temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
          top_p=float(kwargs.get("top_p", 1.0) or 1.0))
      for start in range(0, len(members), self.batch_size):
        batch = members[start: start + self.batch_size]
        prompts = [encode_context(self.tokenizer, requests[i].args[0], self.max_length - max_new)
                   for i in batch]
        eos = generate.eos_ids(self.cfg, self.tokenizer)
        # A row's tokens never depend on how long the others run: stopping once every row
        # holds a stop string changes no output.
        result = generate.generate(self.params, self.cfg, prompts, sampling, eos_ids=eos,
                                   mesh=self.mesh, stop_when=functools.partial(
                                       all_stopped, self.tokenizer, until, set(eos)))
        for i, tokens in zip(batch, result.tokens):
          out[i] = cut_at_stop(self.tokenizer.decode(tokens), until)
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out

  def get_model_info(self) -> dict:
    return {"model_dir": str(self.model_dir), "backend": MODEL_NAME}


def cli() -> None:
  """lm-eval's command line (``lm_eval ...``) with the ``minitron_jax`` model registered."""
  from lm_eval.__main__ import cli_evaluate

  cli_evaluate()


if __name__ == "__main__":
  cli()
