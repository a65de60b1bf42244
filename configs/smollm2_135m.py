"""Default recipe: the real SmolLM2-135M-Instruct teacher, sized for a 2-core CPU (20 to 30 min).

Each student keeps about half of the teacher's non-embedding parameters: by width (MLP
1536 -> 480 in every layer; hidden, heads and layers kept) or by depth (30 -> 15 layers, the
contiguous block whose removal raises the LM loss least). A width target that also cuts the
hidden size must keep it divisible by the head count (e.g. 432 = 9 x 48), which transformers 5
demands of Llama configs even with an explicit head_dim.

  python launch/minitron.py --config=configs/smollm2_135m.py --config.eval.limit=50
"""

from configs import base


def get_config():
  c = base.get_config()
  c.run_dir = "runs/smollm2-135m"
  # WikiText-2 valid mixed with the teacher's own chat answers (128 documents, three rounds in
  # four short factual questions; the report's prompts are never among them). With this mix
  # the width student answers "What is the capital of France?" with Paris (P(" Paris") after
  # "The capital of France is": 0.35; 0.14 at a 0.7 / 0.3 mix with half the rounds factual;
  # 0.008 on WikiText-2 alone).
  c.data.source = ("wikitext2", "synthetic")
  c.data.weights = (0.6, 0.4)
  c.data.synthetic.num_documents = 128
  c.data.synthetic.fact_share = 0.75
  return c
