"""Default recipe: the real SmolLM2-135M-Instruct teacher, sized for a 2-core CPU (~29 min).

Each student keeps about half of the teacher's non-embedding parameters: by width (hidden
576 -> 432, MLP 1536 -> 896; 432 = 9 x 48 keeps hidden_size divisible by the head count, which
transformers 5 demands of Llama configs even with an explicit head_dim) or by depth (30 -> 15
layers, the contiguous block whose removal raises the LM loss least).

  python launch/minitron.py --config=configs/smollm2_135m.py --config.eval.limit=50
"""

from configs import base


def get_config():
  c = base.get_config()
  c.run_dir = "runs/smollm2-135m"
  return c
