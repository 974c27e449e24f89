"""examples/lm_prompt/checkpoint.py: config normalisation, safetensors loading, errors, tokenizer.

Checkpoints are tiny random models written by ``transformers``' ``save_pretrained`` (see
`tests.lm_fixtures`); broken ones are rewritten from them with ``safetensors.numpy``.
"""

from __future__ import annotations

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures as fx

torch = fx.torch
from safetensors.numpy import load_file, save_file  # noqa: E402

from examples.lm_prompt import checkpoint, model  # noqa: E402


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama")
  fx.save_hf_model("llama", directory)
  return directory


def _rewrite(src, dst, edit):
  """Copy a single-file checkpoint with its tensors edited (``edit(dict) -> dict``)."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  tensors = edit(load_file(src / "model.safetensors"))
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def _write_config(directory, hf: dict):
  directory.mkdir(exist_ok=True)
  (directory / "config.json").write_text(json.dumps(hf))
  return directory


_LLAMA = dict(
  model_type="llama",
  vocab_size=100,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=8,
  num_key_value_heads=2,
  intermediate_size=128,
  max_position_embeddings=4096,
)


def test_load_config_reads_current_and_legacy_rope_keys(tmp_path):
  """rope settings come from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
  llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
  current = checkpoint.load_config(
    _write_config(
      tmp_path / "current",
      dict(
        _LLAMA,
        rope_parameters=dict(
          llama3, rope_type="llama3", rope_theta=5e5, original_max_position_embeddings=8192
        ),
      ),
    )
  )
  assert (current.rope_type, current.rope_theta, current.rope_factor) == ("llama3", 5e5, 8.0)
  assert current.rope_original_max_positions == 8192
  assert (current.rope_low_freq_factor, current.rope_high_freq_factor) == (1.0, 4.0)
  assert (current.head_dim, current.num_kv_heads, current.tie_word_embeddings) == (8, 2, False)

  legacy = checkpoint.load_config(
    _write_config(
      tmp_path / "legacy",
      dict(_LLAMA, rope_theta=5e5, rope_scaling=dict(llama3, rope_type="llama3")),
    )
  )
  # original_max_position_embeddings absent: HF falls back to max_position_embeddings.
  assert (legacy.rope_type, legacy.rope_theta, legacy.rope_original_max_positions) == (
    "llama3",
    5e5,
    4096,
  )
  oldest = checkpoint.load_config(
    _write_config(
      tmp_path / "oldest",
      dict(_LLAMA, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4}),
    )
  )
  assert (oldest.rope_type, oldest.rope_theta, oldest.rope_factor) == ("linear", 1e6, 4.0)
  plain = checkpoint.load_config(_write_config(tmp_path / "plain", dict(_LLAMA, rope_scaling=None)))
  assert (plain.rope_type, plain.rope_theta) == ("default", 10000.0)
  with pytest.raises(ValueError, match="'yarn' is not supported"):
    checkpoint.load_config(
      _write_config(tmp_path / "yarn", dict(_LLAMA, rope_scaling={"type": "yarn", "factor": 4}))
    )


def test_load_config_family_flags(tmp_path):
  """Biases, qk-norm, sliding windows and tied heads per model_type, with HF's defaults."""
  qwen2 = checkpoint.config_from_hf(dict(_LLAMA, model_type="qwen2", use_sliding_window=False))
  assert (qwen2.qkv_bias, qwen2.out_bias, qwen2.qk_norm, qwen2.sliding_window) == (
    True,
    False,
    False,
    None,
  )
  qwen3 = checkpoint.config_from_hf(dict(_LLAMA, model_type="qwen3", head_dim=32))
  assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
  mistral = checkpoint.config_from_hf(dict(_LLAMA, model_type="mistral", sliding_window=4096))
  assert (mistral.sliding_window, mistral.qkv_bias) == (4096, False)
  assert checkpoint.config_from_hf(dict(_LLAMA, model_type="mistral")).sliding_window is None
  opt = checkpoint.config_from_hf(
    dict(
      model_type="opt",
      vocab_size=50272,
      hidden_size=1024,
      num_hidden_layers=24,
      num_attention_heads=16,
      ffn_dim=4096,
      max_position_embeddings=2048,
      do_layer_norm_before=False,
      word_embed_proj_dim=512,
    )
  )  # opt-350m's config.json (abridged)
  assert (opt.embed_dim, opt.projects_embeddings, opt.final_norm) == (512, True, False)
  assert (opt.tie_word_embeddings, opt.norm_eps, opt.activation) == (True, 1e-5, "relu")


def test_unsupported_model_type_names_file_and_supported_types(tmp_path):
  directory = _write_config(tmp_path / "gpt2", dict(_LLAMA, model_type="gpt2"))
  with pytest.raises(ValueError) as info:
    checkpoint.load_config(directory)
  message = str(info.value)
  assert "'gpt2'" in message and "opt, llama, mistral, qwen2, qwen3" in message
  assert str(directory / "config.json") in message


def test_missing_directory_and_files(tmp_path, llama_dir):
  missing = tmp_path / "nowhere"
  for load in (checkpoint.load_config, checkpoint.load_tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere"):
      load(missing)
  config = checkpoint.load_config(llama_dir)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoint.load_params(missing, config)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    checkpoint.load_config(empty)
  with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
    checkpoint.load_params(empty, config)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    checkpoint.load_tokenizer(llama_dir)


@pytest.mark.parametrize(
  "case, tensor, message",
  [
    ("missing", "model.layers.1.mlp.up_proj.weight", "is missing from"),
    ("extra", "model.layers.2.mlp.up_proj.weight", "unexpected tensor"),
    (
      "misshaped",
      "model.layers.0.self_attn.k_proj.weight",
      r"shape \(32, 16\), expected \(16, 32\)",
    ),
  ],
)
def test_bad_tensor_is_named_with_its_file(tmp_path, llama_dir, case, tensor, message):
  def edit(tensors):
    if case == "missing":
      del tensors[tensor]
    elif case == "extra":
      tensors[tensor] = tensors["model.layers.1.mlp.up_proj.weight"]
    else:
      tensors[tensor] = np.ascontiguousarray(tensors[tensor].T)
    return tensors

  bad = _rewrite(llama_dir, tmp_path / case, edit)
  with pytest.raises(ValueError, match=message) as info:
    checkpoint.load_params(bad, checkpoint.load_config(bad))
  assert repr(tensor) in str(info.value) and str(bad / "model.safetensors") in str(info.value)


def test_name_prefixes_and_ignored_buffers(tmp_path, llama_dir):
  """Base-model names without ``model.`` load the same; rotary inv_freq buffers are skipped."""
  config = checkpoint.load_config(llama_dir)
  want = checkpoint.load_params(llama_dir, config)

  def strip(tensors):
    out = {k.removeprefix("model."): v for k, v in tensors.items()}
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    return out

  chex.assert_trees_all_equal(
    checkpoint.load_params(_rewrite(llama_dir, tmp_path / "bare", strip), config), want
  )


def test_tied_head_copy_must_equal_embeddings(tmp_path):
  """A tied model may carry an lm_head.weight only if it equals the token table."""
  src = tmp_path / "qwen2"
  fx.save_hf_model("qwen2", src)
  config = checkpoint.load_config(src)
  assert config.tie_word_embeddings and "lm_head" not in checkpoint.load_params(src, config)

  def copy(tensors):
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors

  def differ(tensors):
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    return tensors

  checkpoint.load_params(_rewrite(src, tmp_path / "copy", copy), config)
  bad = _rewrite(src, tmp_path / "differ", differ)
  with pytest.raises(ValueError, match="'lm_head.weight'.*differs from the token embeddings"):
    checkpoint.load_params(bad, config)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, llama_dir):
  """A checkpoint saved in several shards gives the same params; a missing shard is named."""
  sharded = tmp_path / "sharded"
  fx.save_hf_model("llama", sharded, max_shard_size="20KB")
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
  config = checkpoint.load_config(sharded)
  want = checkpoint.load_params(llama_dir, config)
  chex.assert_trees_all_equal(checkpoint.load_params(sharded, config), want)
  scanned = checkpoint.load_params(sharded, config, scan_layers=True)
  chex.assert_trees_all_equal(scanned, model.stack_layers(want))
  (sharded / shards[-1]).unlink()
  with pytest.raises(FileNotFoundError, match=shards[-1]):
    checkpoint.load_params(sharded, config)


def test_bf16_checkpoint(tmp_path):
  """bf16 safetensors load as bf16 (or cast); logits match torch's on the same bf16 weights.

  Cast to float32 on loading, the weights are exactly torch's bf16 weights, so the float32 bound
  of test_lm_model (1e-5 of the logit scale) applies. Kept in bf16, the forward runs in bf16 and
  the float32 logits stay within 0.05 of the scale (measured 0.006-0.009, see test_lm_model).
  """
  directory = tmp_path / "bf16"
  hf = fx.save_hf_model("qwen2", directory, dtype=torch.bfloat16)
  config = checkpoint.load_config(directory)
  params = checkpoint.load_params(directory, config)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  as_f32 = checkpoint.load_params(directory, config, dtype=jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(as_f32)} == {jnp.dtype(jnp.float32)}

  # A fresh float32 model with the bf16 weights: ``hf.float()`` would keep the rotary inv_freq
  # buffer that ``.to(torch.bfloat16)`` rounded to bf16.
  reference = fx.build_hf_model("qwen2")
  reference.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
  ids, mask = fx.padded_batch("left")
  ref = fx.hf_logits(reference, ids, mask)
  full = model.logits(as_f32, config, model.forward(as_f32, config, ids, mask))
  assert fx.max_scaled_error(full, ref, mask) <= 1e-5
  low = model.logits(params, config, model.forward(params, config, ids, mask))
  assert low.dtype == jnp.float32
  assert fx.max_scaled_error(low, ref, mask) <= 0.05
  assert model.causal_lm_loss(params, config, ids, mask).dtype == jnp.float32


def test_load_tokenizer(tmp_path, llama_dir):
  """A tokenizer.json beside the model (a WordLevel one trained here) loads and round-trips."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  rng = np.random.default_rng(0)
  words = ["the", "movie", "was", "great", "terrible", "plot", "acting", "not", "very", "fun"]
  sentences = [" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(300)]
  tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"])
  tokenizer.train_from_iterator(sentences, trainer)
  directory = tmp_path / "with_tokenizer"
  shutil.copytree(llama_dir, directory)
  tokenizer.save(str(directory / "tokenizer.json"))

  loaded = checkpoint.load_tokenizer(directory)
  encoding = loaded.encode("the plot was not great")
  assert encoding.ids == tokenizer.encode("the plot was not great").ids
  assert loaded.decode(encoding.ids) == "the plot was not great"
  assert loaded.get_vocab_size() == len(words) + 3 <= fx.VOCAB
  assert loaded.token_to_id("<pad>") == 0
