"""GGUF tokenizers without torch.

Import: the tokenizer files built from the teacher's GGUF metadata behave exactly like
transformers' own GGUF tokenizer. Export: the GGUF file gets the llama.cpp pre-tokenizer that
splits text like the HF tokenizer. `LlamaCppTokenizer` is an independent reference of llama.cpp's
byte-level BPE: its pre-tokenizer regexes (src/llama-vocab.cpp) and rank-ordered merges over the
GGUF file's own tokens.
"""

import json
import os
import shutil
import subprocess
import sys

import gguf
import jax
import pytest
import regex

from minitron_jax import model as M
from minitron_jax.config import preset
from minitron_jax.io import gguf_tokenizer as GT
from minitron_jax.quantize import formats as Q
from minitron_jax.quantize import gguf_export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "It's here; we'll see. They've said I'd go, you're sure? I'm fine. IT'S WE'LL",
    "Numbers: 1234567, 3.14159, -42 and 1,000,000 in 2024.",
    "def f(x):\n    if x > 0:\n\treturn {'a': [1, 2]}\n    return None  # done\n",
    "Accents: café, naïve, Ærøskøbing. CJK: 我想在apple工作，日本語のテキスト、한국어.",
    "Emoji: 🚀🦙😶\u200d🌫️ ✅ 👍🏽 and Arabic: مرحبا بالعالم",
    "spaces   multiple    \n\n\n newlines\t\ttabs \r\n end   ",
    "<|im_start|>user\nhi<|im_end|> <repo_name> text<file_sep>",
    "", " ", "\n",
    GT.CHKTXT,
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "It's 2+2?"},
        {"role": "assistant", "content": "4, we'd say."}, {"role": "user", "content": "Why? 😶"}]

# llama.cpp's split regexes per pre-tokenizer type, applied one after another.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA_CPP_SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt-2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                  r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+"],
}


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table that byte-level BPE spells tokens in."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in kept]
  return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


_BYTES = _byte_chars()


def _split(pieces: list[str], pattern: str) -> list[str]:
  """Splits every piece at the matches of `pattern`, keeping matches and the text between."""
  out = []
  for piece in pieces:
    pos = 0
    for m in regex.finditer(pattern, piece):
      out += [piece[pos:m.start()], m.group()]
      pos = m.end()
    out.append(piece[pos:])
  return [p for p in out if p]


def _tokenizer_fields(path) -> dict:
  return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
          if k.startswith("tokenizer.")}


class LlamaCppTokenizer:
  """llama.cpp's tokenization (special tokens parsed) of a GGUF file's `tokenizer.*` fields."""

  def __init__(self, meta):
    self.meta = meta
    self.pre = meta["tokenizer.ggml.pre"]
    tokens = meta["tokenizer.ggml.tokens"]
    self.ids = {t: i for i, t in enumerate(tokens)}
    self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    specials = [t for t, k in zip(tokens, meta["tokenizer.ggml.token_type"]) if k in (3, 4)]
    self.specials = regex.compile("(" + "|".join(map(regex.escape, sorted(
        specials, key=len, reverse=True))) + ")")
    # llama.cpp's defaults for absent flags.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", self.pre == "llama-bpe")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    self.prefix = [meta["tokenizer.ggml.bos_token_id"]] if add_bos else []
    self.suffix = [meta["tokenizer.ggml.eos_token_id"]] if add_eos else []

  def _bpe(self, word: str) -> list[str]:
    if self.pre == "llama-bpe" and word in self.ids:  # llama.cpp's ignore_merges
      return [word]
    parts = list(word)
    while len(parts) > 1:
      rank, i = min((self.ranks.get(pair, float("inf")), i)
                    for i, pair in enumerate(zip(parts, parts[1:])))
      if rank == float("inf"):
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts

  def encode(self, text: str) -> list[int]:
    ids = list(self.prefix)
    for i, part in enumerate(self.specials.split(text)):
      if i % 2:
        ids.append(self.ids[part])
        continue
      words = [part]
      for pattern in LLAMA_CPP_SPLITS[self.pre]:
        words = _split(words, pattern)
      for word in words:
        ids += [self.ids[p] for p in self._bpe("".join(_BYTES[b] for b in word.encode()))]
    return ids + self.suffix


def _load(tok_dir):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def teacher_meta(real_gguf):
  return GT.tokenizer_metadata(gguf.GGUFReader(real_gguf))


@pytest.fixture(scope="module")
def teacher_tok_dir(teacher_meta, tmp_path_factory):
  """Tokenizer files built from the teacher GGUF by our torch-free builder."""
  d = tmp_path_factory.mktemp("teacher_tok")
  GT.write_tokenizer_files(teacher_meta, d, 8192)
  return d


# ---------------------------------------------------------------------------- import


@pytest.mark.slow
def test_import_matches_transformers_gguf_tokenizer(real_gguf, teacher_tok_dir):
  pytest.importorskip("torch")  # transformers' GGUF tokenizer path needs it
  import transformers

  ours = _load(teacher_tok_dir)
  ref = transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent),
                                                   gguf_file=real_gguf.name)
  n_ids = 0
  for text in TEXTS:
    ids = ours(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    n_ids += len(ids)
  assert n_ids > 400
  for conv in (CHAT, CHAT[1:]):
    kw = dict(add_generation_prompt=True)
    assert (ours.apply_chat_template(conv, tokenize=False, **kw)
            == ref.apply_chat_template(conv, tokenize=False, **kw))
    assert (ours.apply_chat_template(conv, tokenize=True, **kw)["input_ids"]
            == ref.apply_chat_template(conv, tokenize=True, **kw)["input_ids"])
  for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id",
               "eos_token_id", "unk_token_id", "pad_token_id", "all_special_ids"):
    assert getattr(ours, attr) == getattr(ref, attr), attr
  assert ours.added_tokens_decoder == ref.added_tokens_decoder
  assert ours.get_vocab() == ref.get_vocab()
  assert ours.model_max_length == 8192


@pytest.mark.slow
def test_import_records_pre_tokenizer(teacher_tok_dir, tmp_path):
  config = json.loads((teacher_tok_dir / "tokenizer_config.json").read_text())
  assert config[GT.PRE_TOKENIZER_KEY] == "smollm"
  assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)
  assert config["chat_template"].startswith("{% for message in messages %}")
  _load(teacher_tok_dir).save_pretrained(str(tmp_path))  # transformers keeps the key
  assert json.loads((tmp_path / "tokenizer_config.json").read_text())[GT.PRE_TOKENIZER_KEY] \
      == "smollm"


@pytest.mark.slow
def test_reference_tokenizes_teacher_gguf_like_hf(real_gguf, teacher_tok_dir):
  ref, ours = LlamaCppTokenizer(_tokenizer_fields(real_gguf)), _load(teacher_tok_dir)
  assert ref.pre == "smollm"
  for text in TEXTS:
    assert ref.encode(text) == ours(text)["input_ids"], text


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "default"])
def test_import_follows_other_pre_tokenizers(teacher_meta, tmp_path, pre):
  """The teacher's vocabulary as if its file named another pre-tokenizer and no BOS flag
  (llama-bpe then adds BOS)."""
  meta = {k: v for k, v in teacher_meta.items() if k != "tokenizer.ggml.add_bos_token"}
  meta["tokenizer.ggml.pre"] = pre
  GT.write_tokenizer_files(meta, tmp_path, 8192)
  ref, ours = LlamaCppTokenizer(meta), _load(tmp_path)
  assert (ours("hi")["input_ids"][0] == teacher_meta["tokenizer.ggml.bos_token_id"]) \
      == (pre == "llama-bpe")
  for text in TEXTS:
    assert ref.encode(text) == ours(text)["input_ids"], text


def test_refuses_unsupported_tokenizer_models():
  with pytest.raises(ValueError, match="SentencePiece.*architecture 'llama' is not supported"):
    GT.build_tokenizer({"tokenizer.ggml.model": "llama", "general.architecture": "llama"})
  with pytest.raises(ValueError, match="tokenizer model 't5' is not supported"):
    GT.build_tokenizer({"tokenizer.ggml.model": "t5"})
  with pytest.raises(ValueError, match="pre-tokenizer 'nope' is not supported"):
    GT.build_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope"})


@pytest.mark.slow
def test_conversion_runs_without_torch(real_gguf, teacher_tok_dir, tmp_path):
  out = tmp_path / "hf"
  code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
          "from minitron_jax.io import gguf_import\n"
          f"out = gguf_import.gguf_to_hf({str(real_gguf)!r}, {str(out)!r})\n"
          "import transformers\n"
          "tok = transformers.AutoTokenizer.from_pretrained(str(out))\n"
          f"print(tok({TEXTS[0]!r})['input_ids'])\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == str(_load(teacher_tok_dir)(TEXTS[0])["input_ids"])
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (out / f).read_text() == (teacher_tok_dir / f).read_text(), f


# ---------------------------------------------------------------------------- export


def _export(source_dir, path, **kw):
  """A tiny random model with the teacher's vocabulary, written as GGUF."""
  cfg = preset("tiny", vocab_size=49152, pad_token_id=2)
  params = Q.quantize_params(M.init_params(cfg, jax.random.key(0)), cfg, Q.QuantFormat.GGUF_Q8_0)
  gguf_export.write_gguf(params, cfg, str(path), str(source_dir), **kw)
  return LlamaCppTokenizer(_tokenizer_fields(path))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["recorded", "detected"])
def test_export_splits_like_hf_tokenizer(teacher_tok_dir, tmp_path, source):
  src = tmp_path / "src"
  shutil.copytree(teacher_tok_dir, src)
  if source == "detected":  # as an HF-native SmolLM2 directory would be
    config = json.loads((src / "tokenizer_config.json").read_text())
    del config[GT.PRE_TOKENIZER_KEY]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
  ref, hf = _export(src, tmp_path / "m.gguf"), _load(src)
  assert ref.pre == "smollm"
  assert (ref.meta["tokenizer.ggml.add_bos_token"], ref.meta["tokenizer.ggml.add_eos_token"]) \
      == (False, False)
  for text in TEXTS:
    assert ref.encode(text) == hf(text)["input_ids"], text


@pytest.mark.slow
def test_export_with_default_pre_splits_contractions_apart(teacher_tok_dir, tmp_path):
  """The control: with llama.cpp's `default` splitting the reference disagrees with HF."""
  ref, hf = _export(teacher_tok_dir, tmp_path / "m.gguf", tokenizer_pre="default"), \
      _load(teacher_tok_dir)
  assert ref.pre == "default"
  assert hf.convert_ids_to_tokens(hf("it's")["input_ids"]) == ["it", "'s"]
  assert hf.convert_ids_to_tokens(ref.encode("it's")) == ["it", "'", "s"]


# ---------------------------------------------------------------------------- detection


@pytest.mark.slow
def test_detects_teacher_pre_tokenizer(real_dir):
  assert GT.detect_pre_tokenizer(_load(real_dir)) == "smollm"


class _StubTokenizer:
  def encode(self, text):
    return [len(text)]


def test_unknown_tokenizer_names_the_flag():
  with pytest.raises(ValueError, match="name it with gguf_tokenizer_pre"):
    GT.detect_pre_tokenizer(_StubTokenizer())


def test_pre_tokenizer_precedence(tmp_path):
  with pytest.raises(ValueError, match="name it with gguf_tokenizer_pre"):
    GT.resolve_pre_tokenizer(tmp_path, _StubTokenizer())
  assert GT.resolve_pre_tokenizer(tmp_path, _StubTokenizer(), "llama-bpe") == "llama-bpe"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({GT.PRE_TOKENIZER_KEY: "qwen2"}))
  assert GT.resolve_pre_tokenizer(tmp_path, _StubTokenizer()) == "qwen2"
  assert GT.resolve_pre_tokenizer(tmp_path, _StubTokenizer(), "gpt-2") == "gpt-2"
