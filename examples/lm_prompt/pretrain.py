"""The embedded default model: a small OPT-style decoder pretrained with Adam on generated text.

MeZO (Malladi et al., arXiv 2305.17333) fine-tunes a *pretrained* LM whose prompt
already half-works. Where no checkpoint can be downloaded, the example makes
one: `build_tokenizer` trains a byte-level BPE on `synthetic.generate_corpus`,
`embedded_config` describes a small OPT-style decoder (arXiv 2205.01068:
learned positions, pre-LN blocks, ReLU MLP, tied head), and `pretrain` fits it
to the corpus as a causal LM with first-order Adam. The corpus follows many
reviews with SST-2's prompt tail and a mostly *surface-rule* answer
(``<review> It was great .``, see `examples.lm_prompt.synthetic`), so the
pretrained model reads ``synthetic-sst2`` zero-shot above chance but well
below the ceiling, as OPT-13B reads SST-2 (58.8% zero-shot in MeZO's
Table 1).

Everything is deterministic in the seed and nothing is cached unless asked:
`save_cache` / `load_cache` keep the pretrained parameters in an ``.npz`` with
the settings that made them, and `load_cache` refuses a file made with other
settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.lm_prompt import model as model_lib
from examples.lm_prompt import synthetic
from examples.lm_prompt import tasks as tasks_lib

# Documents the tokenizer is trained on (its merges run out long before the
# vocabulary does, so every word of the language becomes one token).
TOKENIZER_DOCS = 5000
# Documents of the pretraining corpus, cycled in a fresh order every epoch.
CORPUS_DOCS = 20000
# Longest pretraining document, BOS and EOS included (the corpus's longest is
# about 35 tokens) and the position table of the embedded model.
CORPUS_LENGTH = 40
MAX_POSITIONS = 64


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
  """How the embedded default is pretrained.

  Attributes:
    steps: Adam steps.
    batch_size: documents per step.
    learning_rate: peak learning rate of a linear warm-up (a tenth of the
      steps) and cosine decay to a tenth of the peak.
    init_std: standard deviation of the initial weights and embeddings.
    rule_fraction: share of the corpus's answers that follow the task's true
      rule rather than the surface rule (`synthetic.generate_corpus`).
    seed: seed of the corpus, the initialisation and the document order.
  """

  steps: int = 2000
  batch_size: int = 32
  learning_rate: float = 3e-3
  init_std: float = 0.1
  rule_fraction: float = 0.3
  seed: int = 0


def build_tokenizer(seed: int):
  """The byte-level BPE of the embedded default, trained on a generated corpus.

  Args:
    seed: seed of the corpus it is trained on.

  Returns:
    A `tokenizers.Tokenizer` with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` as
    ids 0 to 3 (`synthetic.PAD_ID`, ...).
  """
  return synthetic.train_tokenizer(synthetic.generate_corpus(TOKENIZER_DOCS, seed))


def embedded_config(
  vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4
) -> model_lib.DecoderConfig:
  """A small OPT-style decoder (pre-LN, ReLU MLP four times as wide, tied head, biases).

  Args:
    vocab_size: rows of the token table (the tokenizer's vocabulary size).
    hidden_size: width of the residual stream.
    num_layers: decoder layers.
    num_heads: attention heads (must divide ``hidden_size``).

  Returns:
    The `model_lib.DecoderConfig`.

  Raises:
    ValueError: ``num_heads`` does not divide ``hidden_size``.
  """
  if hidden_size % num_heads:
    raise ValueError(f"num_heads {num_heads} must divide hidden_size {hidden_size}")
  return model_lib.DecoderConfig(
    family="opt",
    vocab_size=vocab_size,
    hidden_size=hidden_size,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=hidden_size // num_heads,
    intermediate_size=4 * hidden_size,
    max_positions=MAX_POSITIONS,
    norm_eps=1e-5,
    activation="relu",
    tie_word_embeddings=True,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    model_type="opt",
  )


def corpus_arrays(tokenizer, seed: int, rule_fraction: float = 0.3) -> dict[str, np.ndarray]:
  """The pretraining corpus, encoded: ``input_ids``, ``attention_mask``, ``loss_mask``.

  Args:
    tokenizer: the embedded tokenizer.
    seed: seed of `synthetic.generate_corpus`.
    rule_fraction: its ``rule_fraction``.

  Returns:
    int32 arrays of shape ``(CORPUS_DOCS, CORPUS_LENGTH)``, right-padded,
    every document ``<s> text </s>``.
  """
  docs = synthetic.generate_corpus(CORPUS_DOCS, seed, rule_fraction=rule_fraction)
  return tasks_lib.encode_causal(
    tokenizer,
    docs,
    CORPUS_LENGTH,
    synthetic.PAD_ID,
    bos_id=synthetic.BOS_ID,
    eos_id=synthetic.EOS_ID,
  )


def pretrain(
  config: model_lib.DecoderConfig,
  tokenizer,
  settings: PretrainSettings,
  progress: Callable[[int, float], None] | None = None,
) -> tuple[model_lib.Params, float]:
  """Fits the embedded model to the synthetic corpus as a causal LM with Adam.

  One jitted, donated step per batch of ``settings.batch_size`` documents, the
  documents of each epoch in a fresh order from ``numpy.random.default_rng(
  [seed, epoch])``. Float32 throughout.

  Args:
    config: the architecture (`embedded_config`).
    tokenizer: the embedded tokenizer.
    settings: steps, batch, learning rate, initialisation and seed.
    progress: called as ``progress(step, loss)`` after every step (loss of that
      step as a float only every 50 steps and at the end, NaN otherwise, to
      keep the device queue full).

  Returns:
    ``(params, loss)``: unrolled float32 parameters on the default device and
    the mean causal-LM loss of the last 50 steps.
  """
  corpus = corpus_arrays(tokenizer, settings.seed, settings.rule_fraction)
  params = model_lib.init_params(
    config, jax.random.key(settings.seed), std=settings.init_std, scan_layers=False
  )
  steps = settings.steps
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    settings.learning_rate,
    max(1, steps // 10),
    max(steps, 2),
    settings.learning_rate / 10,
  )
  tx = optax.adam(schedule)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    return model_lib.causal_lm_loss(
      p, config, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    )

  @_donating_jit
  def step(p, s, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  n = len(corpus["input_ids"])
  order, epoch = None, -1
  losses = []
  for i in range(steps):
    start = i * settings.batch_size
    rows = []
    for position in range(start, start + settings.batch_size):
      if position // n != epoch:
        epoch = position // n
        order = np.random.default_rng([settings.seed, epoch]).permutation(n)
      rows.append(order[position % n])
    batch = {k: jnp.asarray(v[np.asarray(rows)]) for k, v in corpus.items()}
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(loss)
    if progress is not None:
      report = (i + 1) % 50 == 0 or i + 1 == steps
      progress(i + 1, float(loss) if report else float("nan"))
  tail = [float(x) for x in losses[-50:]]
  return params, float(np.mean(tail)) if tail else float("nan")


def _donating_jit(fn):
  """`jax.jit` with the parameters and optimizer state donated."""
  return jax.jit(fn, donate_argnums=(0, 1))


def cache_key(config: model_lib.DecoderConfig, settings: PretrainSettings) -> str:
  """The settings a cached model was made with, as a canonical JSON string."""
  payload = {"config": dataclasses.asdict(config), "pretrain": dataclasses.asdict(settings)}
  return json.dumps(payload, sort_keys=True)


def save_cache(
  path: str | os.PathLike, params: model_lib.Params, key: str, extras: dict | None = None
) -> None:
  """Writes pretrained parameters and the settings that made them to an ``.npz``.

  Written to a temporary file first and renamed, so an interrupted write
  leaves no partial cache behind.

  Args:
    path: the ``.npz`` file.
    params: unrolled parameters.
    key: `cache_key` of the settings.
    extras: JSON-able facts to keep beside them (e.g. the final loss).
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
  meta = json.dumps({"key": key, "extras": extras or {}})
  tmp = f"{os.fspath(path)}.tmp.npz"
  np.savez(tmp, __meta__=np.asarray(meta), **arrays)
  os.replace(tmp, path)


class CacheMismatchError(ValueError):
  """A pretrained cache made with other settings (or not a cache at all)."""


def load_cache(
  path: str | os.PathLike, config: model_lib.DecoderConfig, key: str
) -> tuple[model_lib.Params, dict]:
  """Reads parameters written by `save_cache`, checking they were made with ``key``.

  Args:
    path: the ``.npz`` file.
    config: the architecture (gives the tree to fill).
    key: `cache_key` of the current settings.

  Returns:
    ``(params, extras)``.

  Raises:
    CacheMismatchError: the file is not such a cache, or was made with other
      settings (the message names them).
  """
  try:
    with np.load(path) as data:
      meta = json.loads(str(data["__meta__"]))
      arrays = {name: data[name] for name in data.files if name != "__meta__"}
  except (OSError, ValueError, KeyError) as e:
    raise CacheMismatchError(f"{os.fspath(path)!r} is not a pretrained cache ({e})") from None
  if meta.get("key") != key:
    saved, wanted = json.loads(meta.get("key", "{}")), json.loads(key)
    differ = sorted(
      f"{group}.{name}"
      for group in wanted
      for name in wanted[group]
      if saved.get(group, {}).get(name) != wanted[group][name]
    )
    raise CacheMismatchError(
      f"{os.fspath(path)!r} holds a model pretrained with other settings ({', '.join(differ)}); "
      "delete it or give another --pretrained-cache"
    )
  shapes = model_lib.param_shapes(config)
  params = jax.tree_util.tree_map_with_path(
    lambda p, _: jnp.asarray(arrays[jax.tree_util.keystr(p)]), shapes
  )
  return params, meta.get("extras", {})
