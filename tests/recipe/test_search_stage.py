"""The recipe's architecture-search stages: enabled by `prune.search.enabled`, evaluated and
reported beside the hand-set students."""

import json

from configs import smollm2_135m
from minitron_jax.recipe import report, stages


def test_search_stages_follow_the_config():
  cfg = smollm2_135m.get_config()
  on = {s.name for s in stages.stages() if s.enabled(cfg)}
  assert not {"prune_search", "distill_search"} & on
  assert "distill_search" not in stages.evaluated_models(cfg)
  cfg.prune.search.enabled = True
  on = {s.name for s in stages.stages() if s.enabled(cfg)}
  assert {"prune_search", "distill_search"} <= on
  names = stages.evaluated_models(cfg)
  assert names.index("distill_search") > names.index("distill_depth")


def test_search_section_tables_every_candidate(tmp_path):
  assert report.search_section(str(tmp_path)) == []
  rows = [dict(rank_oneshot=2, hidden_size=432, intermediate_size=896, num_attention_heads=9,
               num_key_value_heads=3, num_hidden_layers=30, params=76_000_000, oneshot_ppl=900.0,
               distilled_ppl=80.0, rank_change=1, winner=True),
          dict(rank_oneshot=1, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_key_value_heads=3, num_hidden_layers=15, params=81_400_000, oneshot_ppl=500.0,
               distilled_ppl=95.0, rank_change=-1, winner=False)]
  (tmp_path / "pruned_search").mkdir()
  (tmp_path / "pruned_search" / "search_report.json").write_text(json.dumps(dict(
      candidates_in_budget=749, scored=2, top_k=2, search_steps=8,
      search_tokens_per_candidate=16384, held_out=dict(windows=8, seq_len=256),
      teacher_loss=3.0, candidates=rows)))
  lines = report.search_section(str(tmp_path))
  table = [line for line in lines if line.startswith("| 576") or line.startswith("| 432")]
  assert table[0].startswith("| 576") and table[1].endswith("| winner |")
  assert "| 900.0 | 80.00 | 1 |" in table[1]
