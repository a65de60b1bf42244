"""Tokenizers between GGUF metadata and Hugging Face files, without torch.

Import: `write_tokenizer_files` turns the `tokenizer.*` metadata of a llama.cpp GGUF file
into `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`:
- byte-level BPE (its `gpt2` tokenizer model): the text is split with the regexes llama.cpp
  uses for the file's `tokenizer.ggml.pre`, so transformers tokenizes like llama.cpp; that name
  is also recorded in `tokenizer_config.json` (`PRE_TOKENIZER_KEY`) for a later GGUF export;
- Gemma's SentencePiece vocabulary (the `llama` tokenizer model of a `gemma3` file): BPE with
  byte fallback, spaces as `▁`, no pre-tokenizer, merges rebuilt from the vocabulary, as
  transformers' own GGUF loader builds a Gemma tokenizer (`gemma_tokenizer` in
  `integrations/gguf/gguf_tokenizer_mapping.py`).

Export: `resolve_pre_tokenizer` names the llama.cpp pre-tokenizer of an HF tokenizer: an explicit
name, else the recorded one, else the hash llama.cpp's converter computes (`detect_pre_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import gguf
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors)

from minitron_jax.io.files import write_json
from minitron_jax.settings import SettingError

PRE_TOKENIZER_KEY = "gguf_pre_tokenizer"

# llama.cpp's split regexes per pre-tokenizer (src/llama-vocab.cpp), applied one after another.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                 "lfm2", "jina-v5-nano")
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), (r"\p{N}", _GPT2)),
    **dict.fromkeys(_LLAMA3_NAMES + ("dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2,)),
    "tekken": (_TEKKEN,),
}
# For these llama.cpp looks a whole pre-token up in the vocabulary before merging, and adds BOS
# unless the file says otherwise.
_LLAMA3_STYLE = frozenset(_LLAMA3_NAMES + ("tekken",))

_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}

# llama.cpp's convert_hf_to_gguf.py: the text whose token ids identify a pre-tokenizer...
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")
# ...and sha256(str(ids)) -> name, from its get_vocab_base_pre.
PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
}


# ---------------------------------------------------------------------------- GGUF -> HF


def tokenizer_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  """The `tokenizer.*` metadata of a GGUF file, arrays included, as plain Python values, and
  its `general.architecture`."""
  return {k: f.contents() for k, f in reader.fields.items()
          if k.startswith("tokenizer.") or k == "general.architecture"}


# Architectures whose SentencePiece vocabulary (llama.cpp's `llama` tokenizer model) converts.
SENTENCEPIECE_ARCHS = ("gemma3",)


def is_sentencepiece(meta: Mapping[str, Any]) -> bool:
  """True for a Gemma SentencePiece vocabulary; ValueError for one this cannot convert."""
  if meta.get("tokenizer.ggml.model") != "llama":
    return False
  arch = meta.get("general.architecture")
  if arch not in SENTENCEPIECE_ARCHS or meta.get("tokenizer.ggml.add_space_prefix", True):
    raise ValueError(f"the SentencePiece ('llama') GGUF tokenizer of architecture {arch!r} is "
                     f"not supported: only {', '.join(SENTENCEPIECE_ARCHS)} (no space prefix)")
  return True


def _pre_name(meta: Mapping[str, Any]) -> str:
  model = meta.get("tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"GGUF tokenizer model {model!r} is not supported: only byte-level BPE "
                     "('gpt2', as Llama 3 and SmolLM use) and Gemma's SentencePiece can be "
                     "converted")
  pre = meta.get("tokenizer.ggml.pre") or "default"  # llama.cpp's fallback for old files
  if pre not in PRE_SPLITS:
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: "
                     f"{', '.join(sorted(PRE_SPLITS))}")
  return pre


def _special_tokens(meta: Mapping[str, Any]) -> dict[str, str]:
  tokens = meta["tokenizer.ggml.tokens"]
  return {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in _SPECIAL_IDS.items()
          if f"tokenizer.ggml.{key}" in meta}


def _add_bos_eos(meta: Mapping[str, Any], pre: str | None) -> tuple[bool, bool]:
  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
  default_bos = pre is None or pre in _LLAMA3_STYLE
  return (bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
          bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def gemma_merges(tokens: list[str]) -> list[tuple[str, str]]:
  """BPE merges implied by a Gemma vocabulary, best first.

  Every split of a token into two tokens is a merge, ranked by the position of the merged token
  in the vocabulary (Gemma's scores do not follow its merge order; its token order does), then
  by the lengths of the two halves; the same order as transformers' `generate_merges` with
  scores `-position`.
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for token in dict.fromkeys(tokens):
    score = -vocab[token]
    local = [(token[:k], token[k:]) for k in range(1, len(token))
             if token[:k] in vocab and token[k:] in vocab]
    local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    merges.extend((score, left, right) for left, right in local)
  merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
  return [(left, right) for _, left, right in merges]


def _sentencepiece_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
  """Gemma's tokenizer: BPE with byte fallback over `▁`-spelled text."""
  # A token of only spaces is stored with real spaces; the text it matches is spelled with ▁.
  tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t
            for t in meta["tokenizer.ggml.tokens"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  tok = Tokenizer(models.BPE(vocab, gemma_merges(tokens), dropout=None, fuse_unk=True,
                             byte_fallback=True,
                             unk_token=tokens[unk] if unk is not None else None))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  # After the normalizer there is no space left: like Gemma's own tokenizer.json, a no-op.
  tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  return tok


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
  """A `tokenizers` tokenizer equivalent to llama.cpp's for this metadata.

  Args:
    meta: `tokenizer_metadata` of the file.

  Raises:
    ValueError: for a tokenizer model or pre-tokenizer llama.cpp defines and this does not.
  """
  if is_sentencepiece(meta):
    return _finish(_sentencepiece_tokenizer(meta), meta, None)
  pre = _pre_name(meta)
  tokens = meta["tokenizer.ggml.tokens"]
  # llama.cpp splits a merge at the first space after its first character.
  merges = [(m[:i], m[i + 1:]) for m in meta["tokenizer.ggml.merges"] for i in [m.find(" ", 1)]]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, dropout=None,
                             continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False, ignore_merges=pre in _LLAMA3_STYLE))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return _finish(tok, meta, pre)


def _finish(tok: Tokenizer, meta: Mapping[str, Any], pre: str | None) -> Tokenizer:
  """Adds the control and user-defined tokens and the BOS/EOS template."""
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
  vocab = tok.get_vocab()
  # Control tokens are special (skipped when decoding); user-defined ones are matched whole in
  # the text but decoded; both as raw text, as llama.cpp matches them. (A user-defined token the
  # vocabulary spells otherwise, Gemma's runs of spaces, is left to the model.)
  tok.add_tokens([AddedToken(t, special=k == _CONTROL, normalized=False)
                  for t, k in zip(tokens, types)
                  if k == _CONTROL or (k == _USER_DEFINED and t in vocab)])
  add_bos, add_eos = _add_bos_eos(meta, pre)
  special = _special_tokens(meta)
  bos = [special["bos_token"]] if add_bos and "bos_token" in special else []
  eos = [special["eos_token"]] if add_eos and "eos_token" in special else []
  tok.post_processor = processors.TemplateProcessing(
      single=[*bos, "$A:0", *eos], pair=[*bos, "$A:0", *eos, *bos, "$B:1", *eos],
      special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(bos + eos)])
  return tok


def tokenizer_config(meta: Mapping[str, Any], max_length: int) -> dict[str, Any]:
  """`tokenizer_config.json` for `build_tokenizer(meta)`, with the GGUF pre-tokenizer name
  (none for SentencePiece)."""
  pre = None if is_sentencepiece(meta) else _pre_name(meta)
  add_bos, add_eos = _add_bos_eos(meta, pre)
  config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
      "add_eos_token": add_eos, **_special_tokens(meta),
      "clean_up_tokenization_spaces": False, "model_max_length": max_length}
  if pre is not None:
    config[PRE_TOKENIZER_KEY] = pre
  if meta.get("tokenizer.chat_template") is not None:
    config["chat_template"] = meta["tokenizer.chat_template"]
  return config


def write_tokenizer_files(meta: Mapping[str, Any], out_dir: str | os.PathLike,
                          max_length: int) -> None:
  """Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

  Args:
    meta: `tokenizer_metadata` of the GGUF file.
    out_dir: existing directory.
    max_length: `model_max_length` (the model's context length).
  """
  out = os.fspath(out_dir)
  build_tokenizer(meta).save(os.path.join(out, "tokenizer.json"))
  write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config(meta, max_length))
  write_json(os.path.join(out, "special_tokens_map.json"), _special_tokens(meta))


# ---------------------------------------------------------------------------- HF -> GGUF


def detect_pre_tokenizer(tokenizer) -> str:
  """llama.cpp's pre-tokenizer name for an HF tokenizer, found as its converter does.

  Args:
    tokenizer: a transformers tokenizer (anything whose `encode(text)` returns ids).

  Raises:
    ValueError: when the token ids of `CHKTXT` hash to no known name.
  """
  digest = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
  if digest not in PRE_HASHES:
    raise SettingError("gguf_tokenizer_pre", "cannot tell the llama.cpp pre-tokenizer of this "
                       f"tokenizer (hash {digest}); name it with {{name}} (e.g. llama-bpe, "
                       "smollm, gpt-2)")
  return PRE_HASHES[digest]


def resolve_pre_tokenizer(source_dir: str | os.PathLike, tokenizer, override: str = "") -> str:
  """The `tokenizer.ggml.pre` to write for the tokenizer of `source_dir`.

  Args:
    source_dir: HF directory the tokenizer was loaded from.
    tokenizer: that tokenizer.
    override: an explicit name; empty for automatic.

  Returns:
    `override` if given; else the name recorded when the directory was converted from a GGUF
    file; else `detect_pre_tokenizer(tokenizer)`.
  """
  if override:
    return override
  path = Path(source_dir) / "tokenizer_config.json"
  if path.is_file():
    recorded = json.loads(path.read_text(encoding="utf-8")).get(PRE_TOKENIZER_KEY)
    if recorded:
      return recorded
  return detect_pre_tokenizer(tokenizer)
