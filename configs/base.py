"""Every recipe setting with its default; recipes start from `get_config()` and override."""

from ml_collections import ConfigDict

TASKS = ["ppl", "winogrande", "piqa", "hellaswag", "arc_easy", "arc_challenge", "lambada",
         "openbookqa"]
# The default evaluates fewer tasks on more examples each, so that differences can exceed their
# standard errors (n = 100: about ±5 points, enough to separate pruned, distilled and teacher
# models); the full list and more examples stay one override away.
DEFAULT_TASKS = ("ppl", "piqa", "arc_easy")


def _train(steps, batch, seq_len, lr, min_lr, warmup):
  return ConfigDict(dict(steps=steps, global_batch_size=batch, micro_batch_size=0, remat=False,
                         seq_len=seq_len, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                         save_every=max(1, steps // 4), eval_every=0, eval_windows=4))


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.teacher = "smollm2-135m"          # known short name, HF directory or hub id
  c.run_dir = "runs/default"
  c.data_root = ""                    # "" = ../shared/data beside the project
  c.dtype = "float32"                 # evaluation / importance compute dtype
  c.train_dtype = "float32"           # training compute dtype (fp32 master weights); the
                                      # CPU recovery runs were measured in float32
  c.mesh = "data:-1"
  c.seed = 0

  c.data = ConfigDict()
  # One source or a tuple mixed by `weights` (share of training characters; () = equal):
  # "wikitext2" (WikiText-2 valid; test is the evaluation set), "synthetic" (the teacher's own
  # answers to seeded chat prompts), "shakespeare", a file, directory, glob or hub name; or a
  # prepared directory (also gs://) or Megatron prefix, its weight a share of the rows.
  c.data.source = ("wikitext2",)   # `--config.data.source=shakespeare` parses as a 1-tuple
  c.data.weights = ()
  c.data.heldout_chars = 24_000       # held out from each source's end (> 8 windows of 512)
  c.data.workers = 0                  # data-loader worker processes (0 = none; same batches)
  c.data.synthetic = ConfigDict(dict(num_documents=256, max_new_tokens=192, batch_size=16,
                                     temperature=0.8, top_p=0.95, fact_share=0.5))

  # Sized for a 2-core CPU (with the SmolLM2 teacher on these settings, 19.7 minutes measured end
  # to end; the default recipe's synthetic data adds 7.5); most of the time goes to distilling
  # the two students and evaluating the models (docs/recipe.md).
  c.correction = _train(steps=8, batch=4, seq_len=256, lr=2e-5, min_lr=2e-6, warmup=2)

  c.prune = ConfigDict()
  c.prune.kinds = ("width", "depth")  # which students to make (a tuple: overridable)
  # Width: the MLP alone (1536 -> 480), 79.8M = 59.3 % of the teacher. Against hidden 432 /
  # MLP 896 (76.0M) from the same teacher on the same tokens (a WikiText-2 / synthetic mix),
  # WikiText-2 test perplexity one-shot 296 against 1,284 and distilled 57.2 against 62.2; on
  # the default data, distilled 54.4 against 56.8 (teacher 27.6), in 386 s against 551 s.
  c.prune.width = ConfigDict(dict(hidden_size=576, intermediate_size=480))
  c.prune.depth = ConfigDict(dict(num_hidden_layers=15))
  c.prune.importance = "activation"
  c.prune.aggregation = "l2,mean"
  c.prune.layer_importance = "lm_loss"
  c.prune.calib_samples = 64
  c.prune.calib_seq_len = 256
  c.prune.eval_samples = 16
  c.prune.batch_size = 8
  c.prune.layer_batches = 1           # batches per layer-removal trial (46 trials for 30 layers)
  # Architecture search (prune/search.py): a third student whose shape is chosen to meet a
  # budget, from the same importance and tokens; then distilled like the width and depth ones.
  # 81.5M total = about half of SmolLM2-135M's non-embedding parameters, as the hand-set ones.
  c.prune.search = ConfigDict(dict(
      enabled=False, target_params=81.5e6, target_memory_gb=0.0, kv_tokens=0,
      export_dtype="bfloat16", budget_slack=0.05, max_width_cut=0.5, max_depth_cut=0.5,
      width_multiple=16, max_candidates=8, top_k=2, steps=8, teacher_topk=64, task="",
      task_limit=100))

  # 24 x 8 x 256 = 49k tokens per student (the most that fits the 30-minute budget): by hand,
  # 82k tokens of WikiText-2 valid took the width student from WikiText-2 test perplexity 960
  # to 74 (teacher 39.6 on the same windows), 12k tokens to 68 on 4 x 512 windows.
  c.distill = _train(steps=24, batch=8, seq_len=256, lr=5e-4, min_lr=5e-5, warmup=3)
  c.distill.kd_temperature = 1.0
  c.distill.hidden_loss = "none"
  # > 0: the teacher runs once over the distillation batches and its top-K logits are cached
  # (stage teacher_logits); every student then reads them instead of running the teacher.
  # Off by default: on the default run the width student from the top-64 cache reached
  # WikiText-2 perplexity 57.7 against 55.1 with the live teacher's full distribution.
  c.distill.teacher_topk = 0
  # Quantization-aware distillation of the students (the distillation job's QAD option): their
  # linear weights pass through fake quantization in this export format inside the loss, and
  # each student is also exported in it (distill_<kind>/quantized). "" = off; qad_method rtn,
  # gptq, awq or awq_gptq ("" = the job's default, rtn; a calibrated method freezes its grid,
  # calibrated on the distillation data).
  c.distill.qad_format = ""
  c.distill.qad_method = ""
  # LoRA recovery (LLM-Pruner): > 0 trains rank-r adapters on the frozen student instead of
  # every weight, then exports them merged (docs/distillation.md#lora-recovery). lora_targets:
  # comma-separated of q,k,v,o,gate,up,down; lora_alpha: 0 = the rank (scale 1);
  # lora_base_format: "" = the base in train_dtype, int8/int4/int4_asym = QLoRA.
  c.distill.lora_rank = 0
  c.distill.lora_targets = "q,k,v,o,gate,up,down"
  c.distill.lora_alpha = 0.0
  c.distill.lora_base_format = ""

  # CE-trained pruned student and random-init student on the same tokens: two more trainings
  # as long as a distillation, so off by default (--config.baselines=True).
  c.baselines = False

  # GGUF blocks need hidden sizes that are multiples of 32 (576 is; 432 is not).
  # Formats: fp8, int8, int4, int4_asym, gguf_q8_0, gguf_q4_0 (docs/quantization.md). One by
  # default (each adds a quantization and an evaluated model); e.g.
  # --config.quantize.formats="('int8','gguf_q4_0')" for more.
  # gguf_tokenizer_pre: llama.cpp's pre-tokenizer name for GGUF exports ("" = the one recorded
  # at GGUF import, else detected from the tokenizer).
  c.quantize = ConfigDict(dict(source="distill_depth", formats=("gguf_q4_0",),
                               gguf_tokenizer_pre=""))

  # Optional one-shot sparsity of a distilled student (docs/sparsity.md), evaluated as model
  # `sparse`: pattern "2:4", "4:8", ... or "unstructured" (at `sparsity`); "" = off. method
  # magnitude, wanda or sparsegpt (the calibrated ones read the training data).
  c.sparsify = ConfigDict(dict(source="distill_depth", pattern="", method="sparsegpt",
                               sparsity=0.5, calib_samples=64, calib_seq_len=512))

  # Tuples, not lists: ml_collections overrides tuples from the command line.
  # max_windows applies to WikiText-2 test and to the held-out slice of the training data.
  # reference_tasks: the only tasks for the models the report does not compare on zero-shot
  # (the teacher before correction, one-shot pruned and quantized models: their scores sit at
  # chance or within noise of their source's; perplexity shows the change). () = all of `tasks`.
  # protocol: shots per task, "zero_shot" or "minitron" (MMLU 5-shot, WinoGrande 5, ARC-Challenge
  # 25, HellaSwag 10; those tasks join `tasks` for the compared models; docs/evaluation.md).
  # qa_task: closed-book QA from the hub for the teacher and every student, exact match of greedy
  # answers as lm-eval scores it: "triviaqa" or "nq_open", ":N" for the first N questions
  # (else `limit`), "" = off.
  c.eval = ConfigDict(dict(tasks=DEFAULT_TASKS, ppl_file="", seq_len=512, max_windows=8,
                           limit=100, batch_size=16, decode_tokens=16, reference_tasks=("ppl",),
                           protocol="zero_shot", qa_task=""))
  c.generate = ConfigDict(dict(
      prompts=("What is the capital of France?",
               "Explain in two sentences why the sky is blue.",
               "Write a haiku about pruning a tree."),
      chat=True, max_new_tokens=32))
  return c
