"""Fixtures shared by the data tests."""

import pytest


@pytest.fixture(scope="session")
def bpe_tokenizer():
  """A byte-level BPE (any text round-trips) with an EOS token, built offline."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is it.",
          "Now is the winter of our discontent.", "All the world's a stage. 0123456789"]
  tok.train_from_iterator(text * 4, trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                              pad_token="<pad>")
