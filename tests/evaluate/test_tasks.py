"""Tests for the zero-shot task loaders and harness-style request tokenization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minitron_jax.evaluate import tasks
from minitron_jax.evaluate.tasks import Example, Request

COUNTS = {
  "winogrande": 1267,
  "piqa": 1838,
  "hellaswag": 10042,
  "arc_easy": 2376,
  "arc_challenge": 1172,
  "openbookqa": 500,
  "lambada": 5153,
  "mmlu": 5686,
}


@pytest.fixture(scope="module")
def loaded(data_root):
  return {name: tasks.load_task(name, data_root) for name in tasks.TASKS}


def test_task_registry():
  assert set(tasks.TASKS) == set(COUNTS)
  assert tasks.TASK_SPECS["lambada"].metrics == ("acc", "ppl")
  assert tasks.TASK_SPECS["winogrande"].metrics == ("acc",)
  for name in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"):
    assert tasks.TASK_SPECS[name].metrics == ("acc", "acc_norm")


@pytest.mark.parametrize("name", list(COUNTS))
def test_counts_labels_and_option_counts(loaded, name):
  examples = loaded[name]
  spec = tasks.TASK_SPECS[name]
  assert len(examples) == COUNTS[name]
  for ex in examples:
    assert ex.task == name
    assert spec.min_choices <= len(ex.requests) <= spec.max_choices
    assert 0 <= ex.label < len(ex.requests)
    assert all(isinstance(r, Request) and r.context and r.continuation for r in ex.requests)
  if name != "lambada":  # every gold position is used, so labels were not collapsed
    assert len({ex.label for ex in examples}) >= 2


def test_spot_check_prompts(loaded):
  wino = loaded["winogrande"][0]
  cont = " always got the easier cases."
  assert wino.requests == (
    Request("Sarah was a much better surgeon than Maria so Sarah", cont),
    Request("Sarah was a much better surgeon than Maria so Maria", cont),
  )
  assert wino.label == 1

  piqa = loaded["piqa"][1]
  assert piqa.requests[0] == Request("Question: dresser\nAnswer:", " replace drawer with bobby pin ")
  assert piqa.requests[1].continuation == " finish, woodgrain with  bobby pin "
  assert piqa.label == 1

  hs = loaded["hellaswag"][0]
  assert hs.requests[0] == Request(
    "Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis."
  )
  assert hs.requests[3].continuation == " starts pulling up roofing on a roof."
  assert hs.label == 3

  arc = loaded["arc_easy"][1]
  assert arc.requests[1] == Request(
    "Question: Which piece of safety equipment is used to keep mold spores from entering the "
    "respiratory system?\nAnswer:",
    " breathing mask",
  )
  assert arc.label == 1

  arc_c = loaded["arc_challenge"][0]
  assert arc_c.requests[2].context.startswith("Question: An astronomer observes that a planet rotates faster")
  assert arc_c.requests[2].continuation == " Planetary days will become shorter."
  assert arc_c.label == 2

  obqa = loaded["openbookqa"][1]
  assert [r.continuation for r in obqa.requests] == [" a marsh", " a tundra", " the plains", " a desert"]
  assert obqa.requests[0].context == "There is most likely going to be fog around:"
  assert obqa.label == 0

  lam = loaded["lambada"][0]
  assert lam.requests[0].continuation == " signs"
  assert lam.requests[0].context.endswith("his mouth curved in a confident grin, I don't care about")
  assert lam.label == 0


def test_hellaswag_harness_preprocessing(loaded):
  examples = loaded["hellaswag"]
  # Leftover WikiHow link markup is removed as the harness's regex does.
  toddler = next(ex for ex in examples if "How to entertain a toddler." in ex.requests[0].context)
  assert "Visit a site like to find loads of creative activities" in toddler.requests[0].context
  for ex in examples:
    texts = [ex.requests[0].context] + [r.continuation for r in ex.requests]
    assert not any("[" in t and "]" in t.split("[", 1)[1] for t in texts)
    # ctx_b.capitalize(): no context ends in a lower-case sentence start.
    ctx = ex.requests[0].context
    if ctx[-1] not in ".!?":
      assert not ctx.rsplit(". ", 1)[-1][:1].islower(), ctx
  assert tasks.hellaswag_preprocess(tasks.hellaswag_preprocess("a [title] b [step] c")) == "a. b c"


def test_limit_takes_first_examples(loaded, data_root):
  first = tasks.load_task("piqa", data_root, limit=5)
  assert first == loaded["piqa"][:5]
  assert tasks.load_task("lambada", data_root, limit=0) == []
  with pytest.raises(ValueError, match="limit"):
    tasks.load_task("piqa", data_root, limit=-1)


def test_unknown_task_lists_known_names(tmp_path):
  with pytest.raises(ValueError, match="known tasks: winogrande, piqa"):
    tasks.load_task("gsm8k", tmp_path)


def test_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="winogrande/dev.jsonl"):
    tasks.load_task("winogrande", tmp_path)


def _write(root: Path, rel: str, lines: list[str]) -> Path:
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


WINO_OK = json.dumps({"qID": "q", "sentence": "A fed B so _ was full.", "option1": "A", "option2": "B", "answer": "2"})
HS_ITEM = ["Cooking: A man cooks. he", "1", "eats.", "runs.", "[title] sleeps.", "cries."]
ARC_BAD = json.dumps({"question": "q", "choices": ["a"], "answer": 3})
OBQA_BAD = [
  "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key",
  "1\tq\t(A) x (B) y\tq\tB",
  "2\tq\t(A) x (C) y\tq\tA",
]


@pytest.mark.parametrize(
  "name, rel, lines, bad_line, why",
  [
    ("winogrande", "winogrande/dev.jsonl", [WINO_OK, WINO_OK, "{not json"], 3, "invalid JSON"),
    ("winogrande", "winogrande/dev.jsonl", [WINO_OK, WINO_OK.replace('"2"', '"3"')], 2, "KeyError"),
    ("winogrande", "winogrande/dev.jsonl", [WINO_OK.replace("_", "it")], 1, "ValueError"),
    ("hellaswag", "hellaswag/hellaswag_val_full.txt", HS_ITEM + HS_ITEM[:1] + ["x"] + HS_ITEM[2:], 8, "gold"),
    ("hellaswag", "hellaswag/hellaswag_val_full.txt", HS_ITEM[:1] + ["7"] + HS_ITEM[2:], 1, "answer 7"),
    ("lambada", "lambada/lambada_openai_test.jsonl", ['{"text": "a b"}', '{"text": "nospace"}'], 2, "final"),
    ("arc_easy", "arc/ARC-Easy-Test.gptfathom.jsonl", [ARC_BAD], 1, "answer 3"),
    ("openbookqa", "openbookqa/test.tsv", OBQA_BAD, 3, "choices"),
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, name, rel, lines, bad_line, why):
  path = _write(tmp_path, rel, lines)
  with pytest.raises(ValueError, match=why) as info:
    tasks.load_task(name, tmp_path)
  assert f"{path}: line {bad_line}:" in str(info.value)


def test_piqa_label_errors(tmp_path):
  goal = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
  _write(tmp_path, "piqa/valid.jsonl", [goal, goal])
  labels = _write(tmp_path, "piqa/valid-labels.lst", ["0", "2"])
  with pytest.raises(ValueError, match=f"{labels}: line 2:"):
    tasks.load_task("piqa", tmp_path)
  _write(tmp_path, "piqa/valid-labels.lst", ["0"])
  with pytest.raises(ValueError, match="2 items but .* 1 labels"):
    tasks.load_task("piqa", tmp_path)


def test_synthetic_formats(tmp_path):
  _write(tmp_path, "hellaswag/hellaswag_val_full.txt", HS_ITEM)
  (hs,) = tasks.load_task("hellaswag", tmp_path)
  assert hs.requests[0].context == "Cooking: A man cooks. He"
  # The harness strips before removing tags, so a leading tag leaves a space behind.
  assert hs.requests[2].continuation == "  sleeps." and hs.label == 1
  # Original ARC layout with a digit answer key.
  choices = [{"label": str(i), "text": t} for i, t in enumerate(("one", "two", "three"), start=1)]
  record = {"id": "x", "question": {"stem": "Pick", "choices": choices}, "answerKey": "3"}
  _write(tmp_path, "arc/ARC-Challenge-Test.gptfathom.jsonl", [json.dumps(record)])
  (arc,) = tasks.load_task("arc_challenge", tmp_path)
  assert arc.label == 2 and arc.requests[2] == Request("Question: Pick\nAnswer:", " three")


def test_real_file_copy_with_broken_line(tmp_path, data_root):
  src = Path(data_root) / "winogrande" / "dev.jsonl"
  lines = src.read_text(encoding="utf-8").split("\n")
  lines[41] = lines[41][:-5]
  _write(tmp_path, "winogrande/dev.jsonl", lines[:-1])
  with pytest.raises(ValueError, match="dev.jsonl: line 42: invalid JSON"):
    tasks.load_task("winogrande", tmp_path)
  shutil.copy(src, tmp_path / "winogrande" / "dev.jsonl")
  assert len(tasks.load_task("winogrande", tmp_path)) == COUNTS["winogrande"]


def test_lengths_for_normalization():
  req = Request("Q:", " café")
  assert tasks.choice_length(req) == 4


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  corpus = [
    "Question: How do I open a jar?\nAnswer: Twist the lid.",
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "Sarah was a much better surgeon than Maria so Maria always got the harder cases.",
  ] * 3
  tok.train_from_iterator(corpus, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _enc(tok, text):
  return tok.encode(text, add_special_tokens=False)


def test_encode_pair_concatenates_to_whole(tokenizer):
  examples = [
    Example("piqa", (Request("Question: How do I open a jar?\nAnswer:", " Twist the lid."),), 0),
    Example(
      "winogrande",
      (Request("so Maria", " always got the harder cases."), Request("so Sarah", " always got the harder cases.")),
      0,
    ),
  ]
  out = tasks.tokenize_requests(examples, tokenizer)
  assert [len(x) for x in out] == [1, 2]
  for ex, pairs in zip(examples, out):
    for req, (ctx_ids, cont_ids) in zip(ex.requests, pairs):
      assert ctx_ids == _enc(tokenizer, req.context)
      assert ctx_ids + cont_ids == _enc(tokenizer, req.context + req.continuation)
      assert cont_ids and tokenizer.bos_token_id not in ctx_ids + cont_ids


def test_encode_pair_moves_trailing_space(tokenizer):
  ctx_ids, cont_ids = tasks.encode_pair(tokenizer, "Answer: ", "Twist")
  assert ctx_ids == _enc(tokenizer, "Answer:")
  assert cont_ids == _enc(tokenizer, "Answer: Twist")[len(ctx_ids):]


def test_encode_pair_empty_context_uses_bos_then_eos(tokenizer):
  ctx_ids, cont_ids = tasks.encode_pair(tokenizer, "", "Twist the lid.")
  assert ctx_ids == [tokenizer.bos_token_id]
  assert cont_ids == _enc(tokenizer, "Twist the lid.")

  class NoBos:
    bos_token_id = None
    eos_token_id = 7

    def encode(self, text, add_special_tokens=False):
      return [ord(c) for c in text]

  assert tasks.encode_pair(NoBos(), "", "ab") == ([7], [97, 98])


def test_tokenize_real_requests(tokenizer, data_root):
  for name in tasks.TASKS:
    examples = tasks.load_task(name, data_root, limit=3)
    for ex, pairs in zip(examples, tasks.tokenize_requests(examples, tokenizer)):
      for req, (ctx_ids, cont_ids) in zip(ex.requests, pairs):
        assert ctx_ids + cont_ids == _enc(tokenizer, req.context + req.continuation)
        assert cont_ids
