"""The whole recipe on the real Gemma 3 270M teacher (`gemma3-270m`, the base model; the Gemma
terms of use apply).

Gemma 3 270M has 100M non-embedding parameters (18 layers of hidden 640, MLP 2048, 4 query
heads and 1 KV head of head_dim 256) and a 168M embedding (262,144 x 640, tied). Each student
keeps about half of the non-embedding parameters: by width (hidden 640 -> 512, which also
shrinks the embedding to 134M; MLP 2048 -> 1024 in every layer; heads and layers kept; 186M in
all), or by depth (18 -> 9 layers; 218M). The width student keeps the teacher's sqrt(640)
embedding scale, which its exports fold into the embedding table and the final norm, the head
still tied. Distillation runs at a peak learning rate of 2e-4: at the base config's 5e-4 the
width student's loss spikes in the first steps and it ends at WikiText-2 perplexity 176
instead of 133 (teacher 57).

The GGUF export (Q8_0) is of the width student: llama.cpp's Gemma 3 fixes a global layer after
every five sliding-window ones, which a depth-pruned student no longer has. The base model has
no chat template, so the report's prompts are completed as plain text (it often predicts
`<start_of_image>` at the end of a sentence, as llama.cpp's forward of the same file does), and
the data is WikiText-2 alone (no synthetic chat answers). A 262,144-token vocabulary makes
every logits tensor 4.6 times SmolLM2's: smaller batches per step. Measured on 2 cores:
docs/recipe.md#the-real-gemma-3-270m.

  python launch/minitron.py --config=configs/gemma3_270m.py --config.eval.limit=50
"""

from configs import base


def get_config():
  c = base.get_config()
  c.teacher = "gemma3-270m"
  c.run_dir = "runs/gemma3-270m"
  c.data.source = ("wikitext2",)
  c.prune.width.hidden_size = 512
  c.prune.width.intermediate_size = 1024
  c.prune.depth.num_hidden_layers = 9
  c.prune.batch_size = 4
  c.prune.search.target_params = 218e6  # total: the 168M embedding + half of the rest
  c.correction.micro_batch_size = 2
  c.distill.micro_batch_size = 2
  c.distill.lr, c.distill.min_lr = 2e-4, 2e-5
  c.quantize.source = "distill_width"
  c.quantize.formats = ("gguf_q8_0",)
  c.eval.batch_size = 8
  c.generate.chat = False
  c.generate.prompts = ("The capital of France is", "The sky is blue because",
                        "Pruning a tree in winter")
  return c
