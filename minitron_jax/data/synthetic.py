"""Synthetic distillation data: the teacher writes a diverse corpus from seed prompts.

Prompts combine a task form with a topic, are wrapped in the teacher's chat template when it
has one, and are sampled in batches (temperature, nucleus); completions are deduplicated on
normalised text and cached as jsonl, so a second run with the same settings reads the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

from minitron_jax.evaluate import generate as G
from minitron_jax.io import files

TOPICS = (
    "the water cycle", "photosynthesis", "the French Revolution", "black holes", "volcanoes",
    "the immune system", "prime numbers", "how a bicycle works", "the Roman Empire", "bees",
    "climate and weather", "the history of the printing press", "electric circuits",
    "the human heart", "plate tectonics", "supply and demand", "the Moon", "machine learning",
    "ancient Egypt", "coral reefs", "gravity", "the internet", "healthy sleep", "rainforests",
    "the periodic table", "Shakespeare's plays", "the Olympic Games", "vaccines", "glaciers",
    "the solar system", "honeybees and pollination", "the Industrial Revolution", "fractions",
    "bread baking", "the ocean tides", "renewable energy", "dinosaurs", "music theory",
    "the Silk Road", "earthquakes", "DNA", "chess strategy", "friendship", "recycling",
)
FORMS = (
    "Explain {t} to a curious twelve-year-old.",
    "Write a short encyclopedia paragraph about {t}.",
    "Give three surprising facts about {t}, with a sentence on each.",
    "Write a short story in which {t} plays a central role.",
    "What are common misconceptions about {t}? Answer in a paragraph.",
    "Summarise the key ideas of {t} in a few sentences.",
    "Write a dialogue between a teacher and a student about {t}.",
    "Describe {t} step by step.",
)
# Short factual questions: answered in a sentence, they keep the student's recall of facts
# and the assistant turn's format; rounds of them end at EOS early, so they are cheap. The
# recipe's own generation prompts are never among them (a test checks).
FACTS = (
    *(f"What is the capital of {c}?" for c in (
        "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "Kenya", "India",
        "Australia", "Mexico", "Norway", "Greece", "Portugal", "Argentina", "China", "Russia",
        "Poland", "Turkey", "Peru", "Sweden", "Ireland", "Thailand", "Morocco")),
    *(f"What language is spoken in {c}?" for c in (
        "Brazil", "Mexico", "Germany", "Japan", "Egypt", "Italy", "Portugal", "Argentina")),
    *(f"What is the chemical symbol for {e}?" for e in (
        "gold", "iron", "oxygen", "sodium", "silver", "carbon", "helium", "potassium")),
    *(f"Who wrote {w}?" for w in (
        "Romeo and Juliet", "Pride and Prejudice", "War and Peace", "Don Quixote", "Hamlet",
        "The Odyssey", "Moby-Dick", "Oliver Twist")),
    *(f"What is the largest {x}?" for x in (
        "planet in the solar system", "ocean on Earth", "desert in the world",
        "mammal on Earth", "country by area", "organ of the human body")),
    *(f"How many {x}?" for x in (
        "legs does a spider have", "days are in a leap year", "continents are there",
        "sides does a hexagon have", "planets are in the solar system", "hours are in a day")),
    *(f"In which country is {p}?" for p in (
        "the Great Wall", "Machu Picchu", "the Colosseum", "the Taj Mahal", "Mount Fuji",
        "the Acropolis", "Stonehenge", "the Sydney Opera House")),
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_documents: int = 256
  max_new_tokens: int = 192
  batch_size: int = 16
  temperature: float = 0.8
  top_p: float = 0.95
  seed: int = 0
  min_chars: int = 40
  # Store each exchange through the chat template (user turn, assistant turn), so a student
  # distilled on it sees the format it will be prompted with; else "prompt\nanswer".
  chat_format: bool = True
  # Share of generation rounds whose prompts are short factual questions (`FACTS`).
  fact_share: float = 0.0

  def key(self, model_id: str) -> str:
    blob = json.dumps([model_id, dataclasses.asdict(self)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seed_prompts(n: int, seed: int, facts: bool = False) -> list[str]:
  """n prompts, cycling through a seeded shuffle of every (form, topic) pair, or of the
  factual questions."""
  pool = list(FACTS) if facts else [
      f.format(t=t) for f in FORMS for t in TOPICS]
  order = np.random.default_rng(seed).permutation(len(pool))
  return [pool[order[i % len(pool)]] for i in range(n)]


def is_fact_round(round_: int, share: float) -> bool:
  """Whether generation round `round_` asks factual questions: `share` of the rounds, spread
  evenly (0 never, 1 always)."""
  return int((round_ + 1) * share) > int(round_ * share)


def normalize(text: str) -> str:
  return re.sub(r"\W+", " ", text.lower()).strip()


def _document(tokenizer, prompt: str, answer: str, chat: bool) -> str:
  if not chat:
    return f"{prompt}\n{answer}"
  return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": answer}],
                                       tokenize=False)


def generate_corpus(params, cfg, tokenizer, out_path: str, sc: SyntheticConfig = SyntheticConfig(),
                    model_id: str = "") -> str:
  """Writes `num_documents` unique teacher completions to `out_path` (jsonl, field `text`);
  reuses the file when it was made with the same model and settings."""
  meta_path = out_path + ".meta.json"
  key = sc.key(model_id)
  if os.path.isfile(out_path) and os.path.isfile(meta_path):
    with open(meta_path) as f:
      if json.load(f).get("key") == key:
        return out_path
  docs, seen = [], set()
  attempts, round_ = 0, 0
  chat = bool(getattr(tokenizer, "chat_template", None))
  t0 = time.perf_counter()
  while len(docs) < sc.num_documents:
    if attempts > 4 * sc.num_documents:
      raise RuntimeError(f"synthetic data: only {len(docs)} unique documents after "
                         f"{attempts} generations; lower num_documents or raise temperature")
    prompts = seed_prompts(sc.batch_size, sc.seed * 1000 + round_,
                           facts=is_fact_round(round_, sc.fact_share))
    ids = [G.encode_prompt(tokenizer, p, chat=chat) for p in prompts]
    res = G.generate(params, cfg, ids, G.SamplingConfig(
        max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_p=sc.top_p,
        seed=sc.seed * 1000 + round_), eos_ids=G.eos_ids(cfg, tokenizer))
    for p, toks in zip(prompts, res.tokens):
      text = tokenizer.decode(toks, skip_special_tokens=True).strip()
      norm = normalize(text)
      if len(text) >= sc.min_chars and norm not in seen and len(docs) < sc.num_documents:
        seen.add(norm)
        docs.append({"prompt": p, "text": _document(tokenizer, p, text,
                                                    chat and sc.chat_format)})
    attempts += len(prompts)
    round_ += 1
    rate = len(docs) / max(time.perf_counter() - t0, 1e-9)
    print(f"synthetic data: {len(docs)}/{sc.num_documents} documents ({rate:.2f}/s, ETA "
          f"{(sc.num_documents - len(docs)) / max(rate, 1e-9):.0f}s)", file=sys.stderr,
          flush=True)
  files.write_jsonl(out_path, docs)
  with open(meta_path, "w") as f:
    json.dump({"key": key, "model": model_id, "settings": dataclasses.asdict(sc),
               "generated": attempts, "kept": len(docs)}, f, indent=2)
  return out_path
