"""Tiny Hugging Face decoders, saved with ``save_pretrained``, for the examples/lm_prompt tests.

Each architecture is a 2-layer model with a 128-token vocabulary and width 32, built with the
``transformers`` PyTorch classes and eager attention. HF initialises norms to one and biases to
zero and draws small weights, which would leave the norm and bias code untested and the logits
near zero; `randomize_` redraws every parameter instead (weights normal with std ``1/sqrt(fan
in)``, embeddings std 1, norm scales ``1 + 0.1 N``, biases ``0.1 N``) so that logits are of order
1-10 and a wrong norm, bias or head shows.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 128
_COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=64,
  attn_implementation="eager",
)
_LLAMA_COMMON = dict(_COMMON, intermediate_size=48, rms_norm_eps=1e-6)


def _hf_config(arch: str):
  """The HF config of one test architecture."""
  t = transformers
  if arch == "opt":  # opt-125m layout: pre-LN, tied head, final LayerNorm
    return t.OPTConfig(**_COMMON, ffn_dim=48, do_layer_norm_before=True, pad_token_id=1)
  if arch == "opt_350m":  # opt-350m layout: post-LN, project_in/out around a narrower table
    return t.OPTConfig(
      **_COMMON, ffn_dim=48, do_layer_norm_before=False, word_embed_proj_dim=16, pad_token_id=1
    )
  if arch == "llama":  # Llama 3.1 style: GQA, llama3 rope scaling, untied head; biases on
    rope = {
      "rope_type": "llama3",
      "rope_theta": 10000.0,
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    }
    return t.LlamaConfig(
      **_LLAMA_COMMON,
      num_key_value_heads=2,
      rope_parameters=rope,
      tie_word_embeddings=False,
      attention_bias=True,
      mlp_bias=True,
    )
  if arch == "qwen2":  # q, k, v biases (no o bias), tied head as in Qwen2-0.5B
    return t.Qwen2Config(
      **_LLAMA_COMMON,
      num_key_value_heads=2,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6},
      tie_word_embeddings=True,
    )
  if arch == "qwen3":  # qk-norm; head_dim 16, so q_proj is wider than the model (as in Qwen3)
    return t.Qwen3Config(
      **_LLAMA_COMMON,
      num_key_value_heads=2,
      head_dim=16,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6},
      tie_word_embeddings=True,
    )
  if arch == "mistral":  # sliding window longer than the test sequences; linear rope scaling
    return t.MistralConfig(
      **_LLAMA_COMMON,
      num_key_value_heads=1,
      sliding_window=32,
      rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
      tie_word_embeddings=False,
    )
  raise ValueError(arch)


ARCHS = ("opt", "opt_350m", "llama", "qwen2", "qwen3", "mistral")


def randomize_(model, seed: int) -> None:
  """Redraw every parameter of a torch model in place (see the module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      elif "embed" in name or p.ndim == 1:
        p.copy_(noise)
      else:
        p.copy_(noise / p.shape[1] ** 0.5)


def build_hf_model(arch: str, seed: int = 0):
  """A randomised HF causal LM of one test architecture, in eval mode."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch))
  randomize_(model, seed)
  return model.eval()


def save_hf_model(arch: str, directory, seed: int = 0, dtype=None, max_shard_size=None):
  """Build, optionally cast, and ``save_pretrained`` a test model; returns the torch model."""
  model = build_hf_model(arch, seed)
  if dtype is not None:
    model = model.to(dtype)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(directory, **kwargs)
  return model


def padded_batch(side: str, seed: int = 0, lengths=(9, 6, 2), pad_id: int = 1):
  """int32 ``(ids, mask)`` of shape ``(3, 9)``, rows padded on the ``"left"`` or ``"right"``."""
  rng = np.random.default_rng(seed)
  t = max(lengths)
  ids = np.full((len(lengths), t), pad_id, np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for row, n in enumerate(lengths):
    cols = slice(t - n, t) if side == "left" else slice(0, n)
    ids[row, cols] = rng.integers(2, VOCAB, n)
    mask[row, cols] = 1
  return ids, mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """float32 logits of a torch model; Llama-family positions counted over real tokens.

  OPT derives its positions from the mask itself. The Llama family's ``forward`` would number
  the positions 0..T-1 whatever the padding; ``generate`` passes ``cumsum(mask) - 1`` as our
  model does, so that is passed here too.
  """
  ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  kwargs = {}
  if model.config.model_type != "opt":
    pos = mask_t.cumsum(-1) - 1
    kwargs["position_ids"] = pos.masked_fill(mask_t == 0, 1)
  with torch.no_grad():
    out = model(input_ids=ids_t, attention_mask=mask_t, **kwargs)
  return out.logits.float().numpy()


def max_scaled_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
  """``max |ours - ref| / max(1, max |ref|)`` over the real (mask 1) positions."""
  real = mask.astype(bool)
  diff = np.abs(np.asarray(ours, np.float64) - ref)[real].max()
  return float(diff / max(1.0, np.abs(ref[real]).max()))
