"""Tokenizes text into prepared shards for training: in parallel, resumable after a kill, the
same shards at any --num_proc, with a manifest (tokenizer fingerprint, counts, checksums).

Examples:
  python launch/prepare_data.py --source=corpus/ --output_dir=data/corpus --tokenizer=smollm2-135m
  python launch/prepare_data.py --source="shards/*.jsonl" --output_dir=data/web \
      --tokenizer=models/teacher --num_proc=16
  python launch/prepare_data.py --source=HuggingFaceFW/fineweb-edu:sample-10BT --streaming \
      --output_dir=data/fineweb --tokenizer=models/teacher --num_proc=32
"""

import os
import sys

from absl import app, flags

# Lets the script run from a source checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitron_jax import cli  # noqa: E402
from minitron_jax.data.prepare import PrepareSpec  # noqa: E402

_D = PrepareSpec(source="")
_SOURCE = flags.DEFINE_string(
    "source", None, "Text to prepare: a .txt / .jsonl / .json file, a directory, a glob, a hub "
    "dataset name[:config], or shakespeare.")
_OUT = flags.DEFINE_string("output_dir", None, "Directory for the shards and manifest.json: "
                           "local, or an object-store URL (gs://bucket/path, s3://...). Running "
                           "again resumes.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Model directory, known model name or hub "
                                 "id whose tokenizer to use (the training run's).")
_NUM_PROC = flags.DEFINE_integer("num_proc", _D.num_proc, "Tokenizing processes.")
_DOCS = flags.DEFINE_integer("docs_per_shard", _D.docs_per_shard, "Documents per shard.")
_FIELD = flags.DEFINE_string("text_field", _D.text_field, "JSON field / dataset column of the "
                             "text.")
_SPLIT = flags.DEFINE_string("split", _D.split, "Hub dataset split.")
_STREAMING = flags.DEFINE_bool("streaming", _D.streaming, "Stream a hub dataset instead of "
                               "downloading it whole first.")
_VERIFY = flags.DEFINE_bool("verify", False, "Afterwards, read every shard back and compare its "
                            "SHA-256 with the manifest.")

flags.mark_flags_as_required(["source", "output_dir", "tokenizer"])


@cli.main_wrapper
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from minitron_jax.data import corpus, prepared
  from minitron_jax.io import hf as hf_io, registry

  spec = PrepareSpec(_SOURCE.value, text_field=_FIELD.value, split=_SPLIT.value,
                     streaming=_STREAMING.value, docs_per_shard=_DOCS.value,
                     num_proc=_NUM_PROC.value)
  spec.validate()
  tok = hf_io.load_tokenizer(str(registry.resolve_model_dir(_TOKENIZER.value)))
  manifest = corpus.prepare(spec, _OUT.value, tok)
  if _VERIFY.value:
    prepared.PreparedSource(_OUT.value, verify=True)
  print(f"{_OUT.value}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
        f"{len(manifest['shards'])} shards")


if __name__ == "__main__":
  app.run(main)
