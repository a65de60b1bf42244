"""Mixing training sources by weight with a held-out slice of each."""

import pytest

from minitron_jax.data import mixture


def _text(tag, n, size=100):
  return "\n\n".join(f"{tag}{i} " + "x" * size for i in range(n))


def test_split_documents_on_paragraphs():
  text = "a" * 30 + "\n \n" + "b" * 30 + "\n\n" + "c" * 30 + "\n\n\n"
  assert mixture.split_documents(text, 70) == ["a" * 30 + "\n\n" + "b" * 30, "c" * 30]
  assert mixture.split_documents("z" * 500, 70) == ["z" * 500]  # a long paragraph stays whole


def test_mix_weights_holdout_and_tags():
  a = mixture.Component("a", [_text("a", 40)], 3.0)
  b = mixture.Component("b", [_text("b", 40)], 1.0)
  train, held, stats = mixture.mix([a, b], heldout_chars=250, seed=0, max_doc_chars=110)
  # 40 one-paragraph documents per source; the last 3 (>= 250 chars) of each are held out.
  assert sorted(r["text"].split()[0] for r in held) == ["a37", "a38", "a39", "b37", "b38",
                                                         "b39"]
  held_texts = {r["text"] for r in held}
  assert not held_texts & {r["text"] for r in train}
  # a needs 3x b's characters, so a is the scarcer: all 37 of its documents, a third as many
  # of b's (no document repeats).
  counts = {s: sum(r["source"] == s for r in train) for s in "ab"}
  assert counts["a"] == 37 and 12 <= counts["b"] <= 14
  assert stats["a"]["weight"] == pytest.approx(0.75)
  assert {r["source"] for r in train} == {"a", "b"}


def test_mix_refuses_bad_input():
  with pytest.raises(ValueError, match="distinct"):
    mixture.mix([mixture.Component("a", ["x\n\ny"]), mixture.Component("a", ["x\n\ny"])],
                 heldout_chars=0)
  with pytest.raises(ValueError, match="positive"):
    mixture.mix([mixture.Component("a", ["x\n\ny"], 0.0)], heldout_chars=0)
  with pytest.raises(ValueError, match="too little"):
    mixture.mix([mixture.Component("a", ["x"])], heldout_chars=0)
