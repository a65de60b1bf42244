"""Quantization: error bounds, packing, JAX inference on quantized params, and exports that
transformers (safetensors and GGUF) and llama.cpp's reader load with the same logits."""

import json
import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import count_compiles, make_hf_llama, torch_logits
from minitron_jax import axes
from minitron_jax.evaluate import generate
from minitron_jax.quantize import gguf_export
from minitron_jax.io import gguf_tokenizer
from minitron_jax.io import hf as hf_io
from minitron_jax import model as M
from minitron_jax.quantize import export as quant_export
from minitron_jax.quantize import run as quantize_run
from minitron_jax.quantize import formats as Q
from minitron_jax.data.calib import CalibSpec
from minitron_jax.config import preset
from minitron_jax.io import files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = Q.QuantFormat
TEXT = ("The quick brown fox jumps over the lazy dog. Quantization maps params to params; "
        "numbers like 12345 and 678 appear too. ") * 40


def _tiny_tokenizer(out_dir):
  """A byte-level BPE tokenizer (320 tokens, ChatML specials at ids 0-2) saved into out_dir."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([TEXT], trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
      pad_token="<|endoftext|>")
  fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}")
  # It splits text like GPT-2, a tokenizer llama.cpp cannot recognise by its token ids.
  fast.init_kwargs[gguf_tokenizer.PRE_TOKENIZER_KEY] = "gpt-2"
  fast.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """Dims that are multiples of 128 (whole FP8 blocks and INT4 groups), with a tokenizer."""
  d = tmp_path_factory.mktemp("tiny") / "m"
  make_hf_llama(d, vocab=384, hidden=256, inter=384, layers=2, heads=4, kv_heads=2,
                head_dim=64)
  _tiny_tokenizer(d)
  return str(d)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return hf_io.load_hf(tiny_dir)


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(3, 320, (2, 12))


def _hf_logits(out_dir, tokens, input_scales=None, inputs=None, **kw):
  """transformers' logits; `input_scales` (a safetensors file with `<module>.activation_scale`
  tensors) makes every such linear layer read its input through torch's float8_e4m3fn cast.

  `inputs` (module name -> our unrounded input to it) forces each hooked layer to round our
  input instead of its own, after checking the two agree to float32 noise. FP8 rounding is a
  step function: a value within that noise of a rounding midpoint lands on a different grid
  point in each implementation, and that step (6 to 12% of the value) spreads to every later
  layer. Forcing keeps both sides on one rounding, so the check below tests which tensor
  each layer rounds and with which exported scale, not where float32 noise falls.
  """
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, **kw)
  if input_scales is not None:
    from safetensors import safe_open

    def fp8_input(scale, ours):
      def hook(module, args):
        x = args[0]
        if ours is not None:
          assert _rel(x.numpy(), ours) <= 1e-4
          x = torch.as_tensor(ours)
        x = x / scale
        return (x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * scale,)
      return hook

    with safe_open(input_scales, "pt") as f:
      names = [n.removesuffix(".activation_scale") for n in f.keys()
               if n.endswith(".activation_scale")]
      assert names and (inputs is None or sorted(names) == sorted(inputs))
      for n in names:
        model.get_submodule(n).register_forward_pre_hook(fp8_input(
            f.get_tensor(f"{n}.activation_scale").float(), None if inputs is None else inputs[n]))
  return torch_logits(model.eval(), tokens)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _quantized(params, cfg, fmt, **kw):
  fmt = Q.parse_format(fmt)
  return quant_export.export_params(Q.quantize_params(params, cfg, fmt, **kw), cfg, fmt, "float32")


def _expanded_scale(q: Q.QuantizedArray):
  out, inp = q.matrix_shape
  return np.asarray(Q.expand_blocks(q.scale.astype(jnp.float32), q.block, out, inp))


# ---------------------------------------------------------------------------- error bounds


def _random_matrix(seed=0, shape=(3, 40, 256)):
  rng = np.random.default_rng(seed)
  m = rng.standard_normal(shape).astype(np.float32)
  m[..., 0, 5] = 30.0  # an outlier per layer
  m[..., 7, :] = 0.0   # an all-zero row
  return jnp.asarray(m)


def test_int8_error_within_half_a_step():
  m = _random_matrix()
  values, scale, zp = Q.quantize_matrix(m, F.INT8_CHANNEL, (1, 256))
  q = Q.QuantizedArray(values, scale, zp, None, F.INT8_CHANNEL.value, (1, 256), (40,), (256,),
                       (0, 1))
  assert values.dtype == jnp.int8 and scale.shape == (3, 40, 1) and zp is None
  assert int(jnp.max(jnp.abs(values))) <= 127
  err = np.abs(np.asarray(q.matrix()) - np.asarray(m))
  assert np.all(err <= _expanded_scale(q) / 2 * (1 + 1e-6))
  assert np.all(np.asarray(q.matrix())[:, 7] == 0)


@pytest.mark.parametrize("fmt", [F.INT4_GROUP, F.INT4_GROUP_ASYM])
def test_int4_error_within_bound(fmt):
  m = _random_matrix(1) + (0.7 if fmt.asymmetric else 0.0)
  values, scale, zp = Q.quantize_matrix(m, fmt, (1, 128))
  q = Q.QuantizedArray(values, scale, zp, None, fmt.value, (1, 128), (40,), (256,), (0, 1))
  assert values.dtype == jnp.uint8 and values.shape == (3, 40, 128)  # two per byte
  assert scale.shape == (3, 40, 2)
  nib = np.asarray(q.int_values())
  assert nib.min() >= 0 and nib.max() <= 15
  err = np.abs(np.asarray(q.matrix()) - np.asarray(m))
  # Symmetric: round to nearest. Asymmetric: plus the zero point's own rounding.
  bound = _expanded_scale(q) * (1.0 if fmt.asymmetric else 0.5) * (1 + 1e-5)
  assert np.all(err <= bound)
  if fmt.asymmetric:
    assert zp.shape == (3, 40, 2) and int(zp.max()) <= 15
  else:
    assert zp is None and nib.min() == 0  # -8 is used


def test_fp8_relative_error_and_saturation():
  m = _random_matrix(2)
  for fmt, block in ((F.FP8_TENSOR, (40, 256)), (F.FP8_CHANNEL, (1, 256)),
                     (F.FP8_BLOCK, (128, 128))):
    values, scale, _ = Q.quantize_matrix(m, fmt, block)
    q = Q.QuantizedArray(values, scale, None, None, fmt.value, block, (40,), (256,), (0, 1))
    assert values.dtype == jnp.float8_e4m3fn
    x, s = np.asarray(m), _expanded_scale(q)
    err = np.abs(np.asarray(q.matrix()) - x)
    normal = np.abs(x) >= 2.0 ** -6 * s  # E4M3's smallest normal, in units of the scale
    assert np.all(err[normal] <= 2.0 ** -4 * np.abs(x[normal]))
    assert np.all(err[~normal] <= 2.0 ** -10 * s[~normal] * (1 + 1e-6))  # half a subnormal
    assert float(jnp.max(jnp.abs(values.astype(jnp.float32)))) == 448.0  # amax -> 448
  got = Q.to_fp8(jnp.array([1e6, -1e6, 500.0, 449.0, -464.0, 448.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                [448, -448, 448, 448, -448, 448, 3])


@pytest.mark.slow
def test_real_weights_error_bounds(real_model):
  params, cfg, _ = real_model
  layers = jax.tree_util.tree_map(lambda x: x[:4], params["layers"])  # four layers suffice
  cfg4 = cfg.replace(num_hidden_layers=4)
  sub = {**params, "layers": layers}
  for fmt, half in ((F.INT8_CHANNEL, 0.5), (F.INT4_GROUP, 0.5)):
    qp = Q.quantize_params(sub, cfg4, fmt)
    for spec, leaf in axes.iter_leaves(qp, cfg4):
      if Q.is_quantized(leaf):
        ref = np.asarray(Q.to_matrix(axes.get(sub, spec), spec))
        err = np.abs(np.asarray(leaf.matrix()) - ref)
        assert np.all(err <= _expanded_scale(leaf) * half * (1 + 1e-5)), spec.name
  stats = Q.error_stats(sub, Q.quantize_params(sub, cfg4, F.FP8_BLOCK), cfg4)
  assert len(stats) == 4 * 7 and all(s["rel_rms_error"] < 2.0 ** -4 for s in stats.values())


# ---------------------------------------------------------------------------- packing


def test_int4_packing_round_trips_and_matches_compressed_tensors():
  torch = pytest.importorskip("torch")
  helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
  rng = np.random.default_rng(0)
  nib = rng.integers(0, 16, (5, 64)).astype(np.uint8)
  packed = np.asarray(Q.pack_int4(jnp.asarray(nib)))
  assert packed.shape == (5, 32) and packed.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(Q.unpack_int4(jnp.asarray(packed), 64)), nib)
  np.testing.assert_array_equal(packed[:, 0], nib[:, 0] | (nib[:, 1] << 4))
  signed = torch.tensor(nib.astype(np.int8) - 8)
  np.testing.assert_array_equal(quant_export.pack_int32(packed, 4), helpers.pack_to_int32(signed, 4).numpy())
  i8 = rng.integers(-127, 128, (5, 64)).astype(np.int8)
  np.testing.assert_array_equal(quant_export.pack_int32(i8, 8),
                                helpers.pack_to_int32(torch.tensor(i8), 8).numpy())
  zp = rng.integers(0, 16, (12, 3)).astype(np.uint8)  # 12 rows: not a multiple of 8
  want = helpers.pack_to_int32(torch.tensor(zp.astype(np.int8) - 8), 4, packed_dim=0)
  np.testing.assert_array_equal(quant_export._pack_zero_points(zp), want.numpy())


@pytest.mark.parametrize("fmt", [F.GGUF_Q8_0, F.GGUF_Q4_0])
def test_gguf_blocks_are_llama_cpp_bytes(fmt):
  m = np.asarray(_random_matrix(3, (1, 24, 96))[0])
  spec = next(s for s in axes.PARAM_SPECS if s.path == ("embed",))  # unstacked [rows, in]
  q = Q.quantize_leaf(jnp.asarray(m), spec, fmt)
  qtype = gguf.GGMLQuantizationType[fmt.value.removeprefix("gguf_").upper()]
  raw = gguf.quants.quantize(m, qtype)
  np.testing.assert_array_equal(gguf_export.encode_blocks(q), raw)
  np.testing.assert_array_equal(np.asarray(q.matrix()), gguf.quants.dequantize(raw, qtype))
  assert q.scale.dtype == jnp.float16


# ---------------------------------------------------------------------------- axes & layout


def test_scales_follow_the_axis_table():
  cfg = preset("tiny")
  params = M.init_params(cfg, jax.random.key(0))
  params["layers"]["q"] = params["layers"]["q"].at[:, :, 1, 3].multiply(1000.0)  # one channel
  qp = Q.quantize_params(params, cfg, F.INT8_CHANNEL)
  q, o = qp["layers"]["q"], qp["layers"]["o"]
  n, h, d = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
  assert q.scale.shape == (cfg.num_hidden_layers, n * h, 1)  # one scale per (head, dim)
  assert (q.out_dims, q.in_dims) == ((n, h), (d,))
  assert (o.out_dims, o.in_dims) == ((d,), (n, h))  # o reduces over heads x head_dim
  s = np.asarray(q.scale[..., 0])
  big = 1 * h + 3
  assert np.all(s[:, big] > 100 * np.delete(s, big, axis=1).max())
  for spec, leaf in axes.iter_leaves(qp, cfg):
    want = axes.get(params, spec).shape
    assert leaf.shape == want, spec.name
    if Q.is_quantized(leaf):  # every array keeps the layers axis that scan slices
      for x in jax.tree_util.tree_leaves(leaf):
        assert x.shape[0] == cfg.num_hidden_layers, spec.name
  assert not Q.is_quantized(qp["embed"]) and not Q.is_quantized(qp["layers"]["attn_norm"])


# ---------------------------------------------------------------------------- JAX inference


def _np_dequantize(q: Q.QuantizedArray) -> np.ndarray:
  """The stored integers/fp8 times their block scales, in numpy, independently of
  `QuantizedArray.matrix`: the reference the forward on quantized params must equal."""
  v = np.asarray(q.values)
  if q.format.kind == "int4":
    v = np.stack([v & 0xF, v >> 4], axis=-1).reshape(*v.shape[:-1], -1).astype(np.float32)
    if q.zero_point is None:
      v = v - 8.0
    else:
      v = v - np.repeat(np.asarray(q.zero_point, np.float32), q.block[1], axis=-1)
  else:
    v = v.astype(np.float32)
  s = np.repeat(np.repeat(np.asarray(q.scale, np.float32), q.block[0], axis=-2), q.block[1],
                axis=-1)[..., :v.shape[-2], :v.shape[-1]]
  w = v * s
  lead = w.ndim - 2
  w = w.reshape(*w.shape[:lead], *q.out_dims, *q.in_dims)
  return w.transpose(*range(lead), *(lead + p for p in q.perm))


def _np_dequantized_params(qp: dict) -> dict:
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(_np_dequantize(x)) if Q.is_quantized(x) else x, qp,
      is_leaf=Q.is_quantized)


@pytest.mark.parametrize("fmt", list(F))
def test_forward_on_quantized_equals_dequantized(fmt):
  cfg = preset("tiny")
  params = M.init_params(cfg, jax.random.key(1))
  qp = Q.quantize_params(params, cfg, fmt, include_embeddings=True)
  tok = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 10)))
  fwd = jax.jit(lambda p: M.forward(p, cfg, tok)["logits"])
  got, want = fwd(qp), fwd(_np_dequantized_params(qp))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  assert _rel(np.asarray(got), np.asarray(fwd(params))) < 0.5  # still the same model


def test_generation_and_memory_on_quantized():
  cfg = preset("tiny")
  params = M.init_params(cfg, jax.random.key(2))
  prompts = [[5, 6, 7, 8], [9, 10]]
  sampling = generate.SamplingConfig(max_new_tokens=6)
  sizes = {}
  for fmt in (F.INT8_CHANNEL, F.INT4_GROUP, F.FP8_BLOCK):
    qp = Q.quantize_params(params, cfg, fmt, include_embeddings=True)
    got = generate.generate(qp, cfg, prompts, sampling, stop_at_eos=False).tokens
    want = generate.generate(_np_dequantized_params(qp), cfg, prompts, sampling,
                             stop_at_eos=False).tokens
    assert got == want
    sizes[fmt] = Q.param_bytes(qp)
  full = Q.param_bytes(params)
  assert sizes[F.INT4_GROUP] < 0.6 * sizes[F.INT8_CHANNEL] and sizes[F.INT8_CHANNEL] < 0.3 * full
  assert sizes[F.FP8_BLOCK] < 0.3 * full


# ---------------------------------------------------------------------------- exports


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("name", list(quant_export.EXPORT_FORMATS))
def test_export_loads_in_transformers(tiny, tiny_dir, tokens, tmp_path, name):
  params, cfg = tiny
  fmt = quant_export.export_format(name)
  qp = _quantized(params, cfg, fmt, include_embeddings=name == "gguf_q4_0")
  out = quant_export.export(qp, cfg, fmt, tmp_path / name, source_dir=tiny_dir)
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray(tokens))["logits"])
  kw = {}
  if fmt.is_gguf:
    kw["gguf_file"] = gguf_export.gguf_file_name(fmt)
  elif name == "int4_asym":  # see quant_export.notes
    import transformers
    kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
  assert _rel(_hf_logits(out, tokens, **kw), ours) <= 1e-3
  if not fmt.is_gguf:
    qc = files.read_json(os.path.join(out, "config.json"))["quantization_config"]
    if name == "fp8":
      assert qc == {"quant_method": "fp8", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    else:
      from compressed_tensors.quantization import QuantizationConfig
      parsed = QuantizationConfig.model_validate(qc)
      assert parsed.ignore == ["lm_head"] and len(parsed.config_groups) == 1
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_fp8_static_activation_scales(tiny, tiny_dir, tokens, tmp_path):
  params, cfg = tiny
  batches = [tokens[:1], tokens[1:]]
  act = Q.calibrate_activation_scales(params, cfg, batches)
  amax = lambda x: jnp.max(jnp.abs(x))  # noqa: E731
  taps = M.forward(params, cfg, jnp.asarray(tokens), taps={"mlp_act": amax})["taps"]
  np.testing.assert_allclose(np.asarray(act["mlp_act"]), np.asarray(taps["mlp_act"]) / 448,
                             rtol=1e-5)
  qp = _quantized(params, cfg, F.FP8_BLOCK, activation_scales=act)
  assert qp["layers"]["down"].input_scale.shape == (cfg.num_hidden_layers,)
  out = quant_export.export(qp, cfg, F.FP8_BLOCK, tmp_path / "fp8s", source_dir=tiny_dir)
  assert files.read_json(os.path.join(out, "config.json"))[
      "quantization_config"]["activation_scheme"] == "static"
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    got = f.get_tensor("model.layers.1.mlp.down_proj.activation_scale")
  assert got.shape == () and np.isclose(got, act["mlp_act"][1])
  # Our forward runs W8A8: each linear input is rounded onto the FP8 grid of its static scale.
  # Reference: transformers on the export (its CPU path dequantizes the weights and leaves
  # activations alone), with torch's own float8 cast applied to every linear input by hooks,
  # each fed our unrounded input to that layer (see `_hf_logits`).
  fwd = M.forward(qp, cfg, jnp.asarray(tokens),
                  taps={t: lambda x: x for t in set(Q.INPUT_TAPS.values())})
  ours = np.asarray(fwd["logits"])
  inputs = {spec.hf_name.format(i=i).removesuffix(".weight"):
            np.asarray(fwd["taps"][Q.INPUT_TAPS[spec.path[-1]]][i]).reshape(*tokens.shape, -1)
            for spec in axes.PARAM_SPECS if spec.path[-1] in Q.INPUT_TAPS
            for i in range(cfg.num_hidden_layers)}
  assert _rel(_hf_logits(out, tokens, input_scales=os.path.join(out, "model.safetensors"),
                         inputs=inputs), ours) <= 1e-3
  plain = _quantized(params, cfg, F.FP8_BLOCK)
  assert _rel(np.asarray(M.forward(plain, cfg, jnp.asarray(tokens))["logits"]), ours) > 1e-3


def test_activation_calibration_compiles_once(tiny, tokens):
  params, cfg = tiny
  batches = [tokens[:1, :9], tokens[1:, :9]]  # a shape no other test compiles
  with count_compiles() as first:
    want = Q.calibrate_activation_scales(params, cfg, batches)
  assert len(first) >= 1
  with count_compiles() as second:
    got = Q.calibrate_activation_scales(params, cfg, batches)
  assert second == []
  for n in want:
    np.testing.assert_array_equal(np.asarray(want[n]), np.asarray(got[n]))


def test_dims_that_are_not_multiples_of_128(tmp_path, tokens):
  d = tmp_path / "odd"
  make_hf_llama(d, vocab=384, hidden=192, inter=320, layers=2, heads=3, kv_heads=1,
                head_dim=64)
  params, cfg = hf_io.load_hf(d)
  # INT4: groups fall back to gcd(in, 128) = 64, described by one config group each.
  qp = _quantized(params, cfg, F.INT4_GROUP)
  assert qp["layers"]["q"].block == (1, 64) and qp["layers"]["down"].block == (1, 64)
  out = quant_export.export(qp, cfg, F.INT4_GROUP, tmp_path / "int4", source_dir=str(d))
  groups = files.read_json(os.path.join(out, "config.json"))[
      "quantization_config"]["config_groups"]
  assert [g["weights"]["group_size"] for g in groups.values()] == [64]
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray(tokens))["logits"])
  assert _rel(_hf_logits(out, tokens), ours) <= 1e-3
  # FP8 blocks: a ceil(out/128) x ceil(in/128) grid whose edge blocks are partial.
  qp = _quantized(params, cfg, F.FP8_BLOCK)
  up = qp["layers"]["up"]
  assert up.scale.shape == (2, 3, 2)  # (layers, ceil(320/128), ceil(192/128))
  w = np.asarray(Q.to_matrix(params["layers"]["up"], next(s for s in axes.PARAM_SPECS if s.path == ("layers", "up"))))[0]
  s = np.asarray(up.scale[0])
  for bi, r in enumerate(range(0, 320, 128)):
    for bj, c in enumerate(range(0, 192, 128)):
      block = w[r:r + 128, c:c + 128]
      assert np.isclose(s[bi, bj], np.abs(block).max() / 448, rtol=1e-6)
  # ... which transformers' CPU dequantization and vLLM's block kernels cannot load: refused.
  with pytest.raises(ValueError, match=r"model.layers.\*.self_attn.q_proj.weight is 192x192, "
                     r"not whole 128x128 blocks.*use fp8_channel$"):
    quant_export.check_consumers(cfg, F.FP8_BLOCK)
  with pytest.raises(ValueError, match="use fp8_channel"):
    quant_export.export(qp, cfg, F.FP8_BLOCK, tmp_path / "fp8", source_dir=str(d))
  assert not (tmp_path / "fp8").exists()
  with pytest.raises(ValueError, match="use fp8_channel"):
    quantize_run.quantize_checkpoint(str(d), str(tmp_path / "fp8"), "fp8")
  assert not (tmp_path / "fp8").exists()
  quant_export.check_consumers(cfg, F.FP8_CHANNEL)
  with pytest.raises(ValueError, match="int8_channel: w has 6 inputs; compressed-tensors packs 4"):
    quant_export.check_consumer_shape("w", 8, 6, F.INT8_CHANNEL)


@pytest.mark.parametrize("name", ["gguf_q8_0", "gguf_q4_0"])
def test_gguf_metadata_and_tensor_types(tiny, tiny_dir, tmp_path, name):
  import transformers

  params, cfg = tiny
  fmt = quant_export.export_format(name)
  out = quant_export.export(_quantized(params, cfg, fmt), cfg, fmt, tmp_path / name, source_dir=tiny_dir)
  path = os.path.join(out, gguf_export.gguf_file_name(fmt))
  r = gguf.GGUFReader(path)
  qtype = gguf.GGMLQuantizationType[name.removeprefix("gguf_").upper()]
  types = {t.name: t.tensor_type for t in r.tensors}
  assert len(types) == 2 + 9 * cfg.num_hidden_layers + 1  # embd, norm, blocks, output
  for n, t in types.items():
    if n.endswith("norm.weight"):
      assert t == gguf.GGMLQuantizationType.F32, n
    elif n in ("token_embd.weight", "output.weight"):
      assert t == gguf.GGMLQuantizationType.F16, n
    else:
      assert t == qtype, n
  meta = {k: f.contents() for k, f in r.fields.items()}
  assert meta["general.architecture"] == "llama"
  assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 256
  assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 64
  assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 384
  assert meta["tokenizer.ggml.pre"] == "gpt-2"
  assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_eos_token"]) == \
      (False, False)
  assert meta["tokenizer.ggml.tokens"][320] == "[PAD320]"
  types_ = meta["tokenizer.ggml.token_type"]
  assert types_[:4] == [3, 3, 3, 1] and types_[320] == gguf.TokenType.UNUSED
  assert len(meta["tokenizer.ggml.merges"]) > 0
  assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
          meta["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
  assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
  tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=os.path.basename(path))
  ref = transformers.AutoTokenizer.from_pretrained(tiny_dir)
  text = "The lazy fox, 12345 <|im_start|>user"
  assert tok(text)["input_ids"] == ref(text)["input_ids"]


def test_gguf_llama3_rope_factors_follow_llama_cpp():
  cfg = preset("llama3.1-8b")
  r = cfg.rope_scaling
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
  want = []
  for f in freqs:  # llama.cpp's converter, written out
    wavelen = 2 * np.pi / f
    if wavelen < r.original_max_position_embeddings / r.high_freq_factor:
      want.append(1.0)
    elif wavelen > r.original_max_position_embeddings / r.low_freq_factor:
      want.append(r.factor)
    else:
      smooth = ((r.original_max_position_embeddings / wavelen - r.low_freq_factor)
                / (r.high_freq_factor - r.low_freq_factor))
      want.append(1 / ((1 - smooth) / r.factor + smooth))
  np.testing.assert_allclose(gguf_export._llama3_rope_factors(cfg), want, rtol=1e-5)


# ---------------------------------------------------------------------------- pipeline & CLI


def test_quantize_checkpoint_report(tiny_dir, tmp_path):
  ppl = tmp_path / "text.txt"
  ppl.write_text(TEXT)
  out = tmp_path / "out"
  rep = quantize_run.quantize_checkpoint(tiny_dir, str(out), "int4", ppl_file=str(ppl), seq_len=32,
                              max_windows=2, progress=False)
  on_disk = files.read_json(out / quant_export.REPORT_FILE)
  assert on_disk == json.loads(json.dumps(rep))
  assert rep["size"]["bytes"] == os.path.getsize(out / "model.safetensors")
  assert rep["size"]["ratio_vs_bf16"] < 0.7
  assert rep["param_bytes"]["quantized"] < rep["param_bytes"]["float32"]
  assert set(rep["tensors"]) == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
  assert all(0 < t["rel_rms_error"] < 0.2 and t["max_abs_error"] > 0
             for t in rep["tensors"].values())
  p = rep["perplexity"]
  assert p["windows"] == 2 and p["before"] > 1 and p["after"] > 1
  assert (out / "tokenizer.json").is_file()
  assert rep["method"] == "rtn" and rep["calibration"] is None
  with pytest.raises(FileExistsError, match="not empty"):
    quantize_run.quantize_checkpoint(tiny_dir, str(out), "int8")
  quantize_run.quantize_checkpoint(tiny_dir, str(out), "gguf_q8_0", overwrite=True)
  assert (out / gguf_export.gguf_file_name(F.GGUF_Q8_0)).is_file()
  assert not (out / "model.safetensors").exists()
  assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp dirs left


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("name,method", [("int4", "gptq"), ("gguf_q4_0", "gptq"),
                                         ("fp8_channel", "gptq"), ("int4_asym", "awq"),
                                         ("int4", "awq_gptq"), ("gguf_q4_0", "awq_gptq")])
def test_gptq_checkpoint_loads_and_reports(tiny_dir, tmp_path, tokens, name, method):
  calib = tmp_path / "calib.txt"
  calib.write_text(TEXT)
  out = tmp_path / name
  rep = quantize_run.run(quantize_run.QuantizeJob(
      tiny_dir, str(out), name, calib=CalibSpec(data=str(calib), samples=4, seq_len=32),
      unquantized_dtype="float32", progress=False,
      method=None if method == "awq_gptq" else method))
  assert rep["method"] == method  # awq_gptq is the default for the 4-bit formats
  c = rep["calibration"]
  assert (c["data"], c["samples"], c["seq_len"], c["act_order"]) == (str(calib), 4, 32, True)
  assert c["seconds"] > 0
  # The export holds the calibrated params of those windows (under AWQ with the scales folded
  # into the norms, the same layout): a consumer's logits equal our forward on params
  # calibrated here from the same windows.
  cfg = hf_io.load_config(tiny_dir)
  fmt = quant_export.export_format(name)
  kw = {"gguf_file": gguf_export.gguf_file_name(fmt)} if fmt.is_gguf else {}
  if fmt is F.INT4_GROUP_ASYM:  # see quant_export.notes
    import transformers
    kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
  params, _ = hf_io.load_hf(tiny_dir)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  from minitron_jax.data import corpus, packing
  from minitron_jax.quantize import calibrate
  tok = hf_io.load_tokenizer(tiny_dir)
  windows = packing.calibration_samples(corpus.load_tokens(str(calib), tok), num_samples=4,
                                        seq_len=32)
  qp = quant_export.export_params(calibrate.calibrated_params(params, cfg, fmt, [windows], method), cfg,
                       fmt, "float32")
  rtn = quant_export.export_params(Q.quantize_params(params, cfg, fmt), cfg, fmt, "float32")
  assert not np.array_equal(np.asarray(qp["layers"]["down"].values),
                            np.asarray(rtn["layers"]["down"].values))
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray(tokens))["logits"])
  assert _rel(_hf_logits(str(out), tokens, **kw), ours) <= 1e-3


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "quantize.py"), *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_inputs_fail_before_work(tmp_path):
  cfg_only = tmp_path / "cfg_only"  # a config but no weights: any load would fail differently
  cfg_only.mkdir()
  json.dump(preset("tiny").to_hf(), open(cfg_only / "config.json", "w"))
  other = tmp_path / "phi3"  # a model type we do not support
  other.mkdir()
  json.dump({**preset("tiny").to_hf(), "model_type": "phi3"},
            open(other / "config.json", "w"))
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("x")
  cases = [
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o1'}", "--format=int3"],
       "--format='int3' is not a known export format"),
      ([f"--model_dir={other}", f"--output_dir={tmp_path / 'o2'}", "--format=int8"],
       "model_type 'phi3'"),
      ([f"--model_dir={cfg_only}", f"--output_dir={busy}", "--format=int8"], "not empty"),
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o3'}", "--format=int4",
        "--method=gptq"], "method=gptq needs calibration data: set --calib_data"),
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o3'}", "--format=fp8_channel",
        "--method=awq_gptq", "--calib_data=shakespeare"], "--method=awq_gptq supports int4_group"),
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o3'}", "--format=int4",
        "--method=awq2"], "--method='awq2' is not a quantization method"),
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o3'}", "--format=gguf_q8_0",
        "--method=awq", "--calib_data=shakespeare"], "--method=awq supports int4_group, "),
      ([f"--model_dir={cfg_only}", f"--output_dir={tmp_path / 'o3'}", "--format=int4_asym",
        "--method=awq_gptq"], "method=awq_gptq needs calibration data: set --calib_data"),
  ]
  for args, msg in cases:
    proc = _cli(*args, "--ppl_file=none")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and msg in lines[-1], proc.stderr
  assert os.listdir(busy) == ["keep.txt"]
  assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


# ---------------------------------------------------------------------------- real teacher


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_real_export_matches_transformers(real_model, real_dir, tmp_path, name):
  params, cfg, tok = real_model
  fmt = quant_export.export_format(name)
  qp = _quantized(params, cfg, fmt)
  out = quant_export.export(qp, cfg, fmt, tmp_path / name, source_dir=str(real_dir))
  ids = np.asarray([tok("The capital of France is Paris, and the capital of Italy is")
                    ["input_ids"]])
  ours = np.asarray(M.forward(qp, cfg, jnp.asarray(ids))["logits"])
  assert _rel(_hf_logits(out, ids), ours) <= 1e-3
  if name == "int8":  # close enough to the float model to agree on the next token
    ref = np.asarray(M.forward(params, cfg, jnp.asarray(ids))["logits"])
    assert ours[0, -1].argmax() == ref[0, -1].argmax()


@pytest.mark.slow
def test_real_gguf_tokenizer_metadata(real_model, real_dir, tmp_path):
  import transformers

  params, cfg, tok = real_model
  fmt = F.GGUF_Q8_0
  out = quant_export.export(_quantized(params, cfg, fmt), cfg, fmt, tmp_path / "g", source_dir=str(real_dir))
  name = gguf_export.gguf_file_name(fmt)
  r = gguf.GGUFReader(os.path.join(out, name))
  assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg.vocab_size
  assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 1
  assert r.fields["tokenizer.chat_template"].contents() == tok.chat_template
  gtok = transformers.AutoTokenizer.from_pretrained(out, gguf_file=name)
  text = "Hello world, 12345 tokens! <|im_start|>user\nhi<|im_end|>"
  assert gtok(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.slow
def test_real_fp8_block_scales_are_no_worse_than_per_tensor(real_model):
  """Finer scales can only shrink the FP8 weight error on the real teacher's weights."""
  params, cfg, _ = real_model
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  err = {fmt: quant_export.summarize(Q.error_stats(params, Q.quantize_params(params, cfg, fmt), cfg))
         for fmt in (F.FP8_TENSOR, F.FP8_CHANNEL, F.FP8_BLOCK)}
  mean = {f: e["mean_rel_rms_error"] for f, e in err.items()}
  assert mean[F.FP8_BLOCK] <= mean[F.FP8_TENSOR] and mean[F.FP8_CHANNEL] <= mean[F.FP8_TENSOR]
  assert 0 < mean[F.FP8_BLOCK] < 0.05
