"""Prompt-based fine-tuning of decoder LMs with zeroth-order optimizers (zojax), as MeZO does it.

MeZO (Malladi et al., arXiv 2305.17333) fine-tunes an autoregressive LM on a
classification task posed as next-token prediction: each example becomes a
prompt (SST-2: ``<sentence> It was``), each class has a label word
(`` terrible`` / `` great``), and the class scores are the LM's logits of the
label words at the last prompt token. The loss is the cross-entropy over those
scores (MeZO's ``--train_as_classification``: with one-token label words it is
the same as scoring each candidate by its log-probability), the prediction is
their argmax. This program runs that recipe with every zojax preset and with
backprop + Adam as the first-order baseline.

Two sources of a model:

* ``--model-dir``: a local Hugging Face directory (``config.json``,
  safetensors weights, ``tokenizer.json``) of an OPT or Llama-family model
  (Llama, Mistral, Qwen2, Qwen3), with a real task (``--task sst2``, ``rte``,
  ``boolq``) read from ``--data-dir`` and sampled as MeZO does (1000 train,
  500 dev, 1000 eval examples).
* nothing (the embedded default, runs anywhere in a few minutes on 2 CPU
  cores): a byte-level BPE tokenizer and a small OPT-style decoder are
  trained from scratch on generated text (examples/lm_prompt/pretrain.py,
  first-order Adam), then fine-tuned on ``synthetic-sst2``, a generated
  sentiment task posed with SST-2's template (examples/lm_prompt/synthetic.py).

One jitted train step with donated buffers holds a whole ZO step (all
queries, subspace refreshes, block switches and the update); the batch is
sharded over every visible device and parameters are replicated (the
optimizer exchanges only loss values). Stops at ``--steps``,
``--forward-budget`` or ``--max-time``, whichever comes first. Writes a
JSON-lines log, a JSON summary, a PNG plot of eval accuracy against forward
passes and wall time, and orbax checkpoints from which ``--resume``
continues bit for bit (parameters, optimizer state with its keys, and the
position in the data order).

Run ``python -m examples.lm_prompt.train --help`` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import zojax
from examples.lm_prompt import checkpoint as checkpoint_lib
from examples.lm_prompt import data as data_lib
from examples.lm_prompt import model as model_lib
from examples.lm_prompt import optimizers, synthetic
from examples.lm_prompt import pretrain as pretrain_lib
from examples.lm_prompt import tasks as tasks_lib
from examples.run_files import UsageError, set_aside, trim_log
from examples.run_files import check_output_dir as _check_output_dir
from examples.run_files import check_output_file as _check_output_file

# Hyperparameters per optimizer when --lr (and the others) are not given.
#
# "embedded": the embedded default (synthetic-sst2 on the pretrained 2-layer model, seed 0). Each
# learning rate was chosen by DEV accuracy only (the eval split was not looked at): a grid in
# steps of about 3x at 10,000 forward passes, then the best two at the default budget of 40,000
# (20,000 MeZO steps; fo-adam: 1000 steps), kept by final dev accuracy (ties: the better dev
# accuracy along the way). Ranks as in the ViT example's small model: 8 of the 64-wide matrices.
# "pretrained": the papers' settings for full fine-tuning of OPT-13B:
#   mezo      lr 1e-6, eps 1e-3 (MeZO's grid {1e-6, 1e-7}; large_models/README.md)
#   mezo_bcd  MeZO's lr; blocks switched every 100 steps in random order (zo-block's defaults)
#   zo_muon   lr 1e-2, rank 64, 4 queries, refresh every 100, 1-D lr 1e-7 (ZO-Muon's LLM recipe)
#   zo_mopi   lr 1e-2, rank 64, k 32, 8 queries, refresh every 500, 1-D lr 1e-7 (its README)
#   lozo      lr 1e-6, rank 2, refresh every 50 (the OPT-13B grid {1e-6, 1e-7}, r {1, 2})
#   lozo_m    as LOZO
#   subzero   lr 1e-7, rank 48, refresh every 1000 (ZO-Muon's SubZero baseline for OPT-13B)
#   fo-adam   lr 1e-5 (MeZO's fine-tuning baseline grid {1e-5, 5e-5, 8e-5})
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
  "embedded": {
    "mezo": {"lr": 1e-4},
    "mezo_bcd": {"lr": 3e-4},
    "zo_muon": {"lr": 1e-2, "rank": 8},
    "zo_mopi": {"lr": 3e-3, "rank": 8},
    "lozo": {"lr": 1e-4},
    "lozo_m": {"lr": 1e-4},
    "subzero": {"lr": 1e-4, "rank": 8},
    "fo-adam": {"lr": 3e-4},
  },
  "pretrained": {
    "mezo": {"lr": 1e-6},
    "mezo_bcd": {"lr": 1e-6},
    "zo_muon": {"lr": 1e-2, "vector_lr": 1e-7},
    "zo_mopi": {"lr": 1e-2, "vector_lr": 1e-7},
    "lozo": {"lr": 1e-6},
    "lozo_m": {"lr": 1e-6},
    "subzero": {"lr": 1e-7, "rank": 48, "refresh_every": 1000},
    "fo-adam": {"lr": 1e-5},
  },
}
# Steps and evaluation interval: the embedded default's, and MeZO's OPT runs (20k steps of batch
# 16, evaluated every 4000).
STEPS = {"embedded": 20000, "pretrained": 20000}
EVAL_EVERY = {"embedded": 1000, "pretrained": 4000}
REAL_TASKS = ("sst2", "rte", "boolq")
TASK_NAMES = (*REAL_TASKS, "synthetic-sst2")
# The embedded default's generated data set: a fixed "train split" and
# "validation split" that --seed samples from, as it samples a real task's.
SYNTHETIC_TRAIN_SIZE = 10000
SYNTHETIC_VALIDATION_SIZE = 2000
SYNTHETIC_SPLIT_SEEDS = {"train": 0, "validation": 1}
EMBEDDED_MAX_LENGTH = 40
HF_MAX_LENGTH = 2048
PAD_MULTIPLE = 8


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows a flag's default unless it is None or a switch (their help says what happens)."""

  def _get_help_string(self, action):
    if action.default is None or isinstance(action.default, bool):
      return action.help
    return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (``argv`` None reads `sys.argv`)."""
  p = argparse.ArgumentParser(
    prog="python -m examples.lm_prompt.train",
    description=__doc__.split("\n\n")[0],
    formatter_class=_HelpFormatter,
  )
  g = p.add_argument_group("model and data")
  g.add_argument(
    "--model-dir",
    default=None,
    help="local Hugging Face model directory (config.json, *.safetensors, tokenizer.json) of an "
    f"OPT or Llama-family model ({', '.join(checkpoint_lib.SUPPORTED_MODEL_TYPES)}); default: "
    "the embedded default (a small OPT-style model pretrained here on generated text).",
  )
  g.add_argument(
    "--task",
    default="synthetic-sst2",
    help=f"one of: {', '.join(TASK_NAMES)} (the real tasks need --data-dir).",
  )
  g.add_argument(
    "--data-dir",
    default=None,
    help="folder with the task's train and validation splits (.tsv, .jsonl, .parquet or "
    "save_to_disk; see examples/lm_prompt/data.py). Required for sst2, rte, boolq.",
  )
  g.add_argument("--num-train", type=int, default=1000, help="training examples (MeZO: 1000).")
  g.add_argument(
    "--num-dev", type=int, default=500, help="development examples (MeZO: 500); 0: none."
  )
  g.add_argument("--num-eval", type=int, default=1000, help="eval examples (MeZO: 1000).")
  g.add_argument(
    "--k-shot",
    type=int,
    default=None,
    help="k training examples per class (LM-BFF / MeZO's RoBERTa setting) instead of --num-train.",
  )
  g.add_argument(
    "--max-length",
    type=int,
    default=None,
    help=f"longest prompt in tokens; longer ones lose their first tokens (default: "
    f"{EMBEDDED_MAX_LENGTH} embedded, else {HF_MAX_LENGTH} or the model's positions).",
  )
  g.add_argument(
    "--layout",
    choices=("unrolled", "scan"),
    default="unrolled",
    help="decoder layers as a list run by a Python loop (every layer its own leaves) or stacked "
    "and run by lax.scan (compile time independent of depth, except for mezo_bcd, whose step "
    "holds one branch per layer either way).",
  )
  g.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="dtype of the weights; losses are computed in float32 either way.",
  )
  g.add_argument(
    "--bf16-update",
    choices=optimizers.BF16_UPDATES,
    default=None,
    help="with --dtype bfloat16: keep a float32 master copy (zojax.master_weights) or round "
    "updates stochastically (zojax.stochastic_rounding). Default: master.",
  )
  g = p.add_argument_group("embedded default (no --model-dir)")
  g.add_argument(
    "--pretrain-steps",
    type=int,
    default=pretrain_lib.PretrainSettings.steps,
    help="Adam steps of causal-LM pretraining on the generated corpus.",
  )
  g.add_argument(
    "--pretrain-batch-size",
    type=int,
    default=pretrain_lib.PretrainSettings.batch_size,
    help="documents per pretraining step.",
  )
  g.add_argument("--embedded-hidden", type=int, default=64, help="width of the embedded decoder.")
  g.add_argument("--embedded-layers", type=int, default=2, help="layers of the embedded decoder.")
  g.add_argument(
    "--pretrained-cache",
    default=None,
    help="save the pretrained parameters to this .npz, or reuse them if it holds a model "
    "pretrained with the same settings.",
  )
  g = p.add_argument_group("optimizer")
  g.add_argument(
    "--optimizer",
    default="mezo",
    help=f"one of: {', '.join(optimizers.NAMES)} (fo-adam uses backprop: the baseline).",
  )
  g.add_argument(
    "--lr", type=float, default=None, help="learning rate (default: per optimizer, see DEFAULTS)."
  )
  g.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale.")
  g.add_argument(
    "--rank", type=int, default=None, help="subspace rank (default: per optimizer or preset)."
  )
  g.add_argument(
    "--num-queries", type=int, default=None, help="ZO directions per step (default: preset's)."
  )
  g.add_argument(
    "--refresh-every",
    type=int,
    default=None,
    help="steps between subspace refreshes / MeZO-BCD block switches (default: preset's).",
  )
  g.add_argument(
    "--vector-lr",
    type=float,
    default=None,
    help="ZO-Muon / ZO-MOPI: learning rate of biases and norms (default: per setting, or lr/100).",
  )
  g = p.add_argument_group("run")
  g.add_argument(
    "--steps",
    type=int,
    default=None,
    help=f"maximum optimizer steps (default: MeZO's {STEPS['pretrained']}).",
  )
  g.add_argument(
    "--forward-budget",
    type=int,
    default=None,
    help="stop before exceeding this many forward passes (compare methods at equal queries).",
  )
  g.add_argument(
    "--max-time",
    type=float,
    default=None,
    help="stop after this many seconds of training (equal-wall-clock comparisons).",
  )
  g.add_argument("--batch-size", type=int, default=16, help="global batch size (MeZO: 16).")
  g.add_argument(
    "--eval-every",
    type=int,
    default=None,
    help=f"steps between dev and eval evaluations (default: {EVAL_EVERY['embedded']} embedded, "
    f"MeZO's {EVAL_EVERY['pretrained']} with --model-dir).",
  )
  g.add_argument(
    "--seed", type=int, default=0, help="seed of data sampling and order, model and directions."
  )
  g = p.add_argument_group("outputs")
  g.add_argument("--checkpoint-dir", default=None, help="save orbax checkpoints here.")
  g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints.")
  g.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest intact checkpoint in --checkpoint-dir (damaged newer steps "
    "are reported and kept aside as <step>.damaged).",
  )
  g.add_argument(
    "--log",
    default=None,
    help="append a JSON line per evaluation to this file (on --resume, lines after the "
    "restored step are dropped first).",
  )
  g.add_argument("--json", default=None, help="write the final summary as JSON here.")
  g.add_argument(
    "--plot", default=None, help="write a PNG of accuracy against forwards and time here."
  )
  g.add_argument("--quiet", action="store_true", help="no progress bar and no printed lines.")
  return p.parse_args(argv)


def _check_args(args: argparse.Namespace, num_devices: int) -> None:
  """Every check of the command line that can fail before anything is read or computed."""
  if args.optimizer not in optimizers.NAMES:
    raise UsageError(
      f"unknown --optimizer {args.optimizer!r}; choose one of: {', '.join(optimizers.NAMES)}"
    )
  if args.task not in TASK_NAMES:
    raise UsageError(f"unknown --task {args.task!r}; choose one of: {', '.join(TASK_NAMES)}")
  positive = ["steps", "batch_size", "eval_every", "checkpoint_every", "num_train", "num_eval"]
  positive += ["embedded_hidden", "embedded_layers", "pretrain_batch_size"]
  optional_positive = ["k_shot", "max_length", "rank", "num_queries", "refresh_every"]
  optional_positive += ["forward_budget"]
  for name in positive + [n for n in optional_positive if getattr(args, n) is not None]:
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
  for name in ("num_dev", "pretrain_steps"):
    if getattr(args, name) < 0:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
  for name in ("lr", "eps", "vector_lr", "max_time"):
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value > 0):
      raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
  if args.batch_size % num_devices:
    raise UsageError(
      f"--batch-size {args.batch_size} is not divisible by the {num_devices} devices the "
      "batch is sharded over; use a multiple of the device count."
    )
  if args.task in REAL_TASKS and not args.data_dir:
    raise UsageError(f"--task {args.task} needs --data-dir: {data_lib.HOW_TO_GET[args.task]}")
  if args.data_dir is not None and not os.path.isdir(args.data_dir):
    raise UsageError(f"--data-dir {args.data_dir} is not a directory")
  if args.model_dir is not None and not os.path.isdir(args.model_dir):
    raise UsageError(f"--model-dir {args.model_dir} does not exist (or is not a directory)")
  if args.model_dir is None and args.task != "synthetic-sst2":
    raise UsageError(
      f"--task {args.task} needs --model-dir: the embedded default model only knows the "
      "synthetic language"
    )
  if args.model_dir is not None and args.pretrained_cache is not None:
    raise UsageError("--pretrained-cache is for the embedded default; drop it with --model-dir")
  if args.bf16_update is not None and args.dtype != "bfloat16":
    raise UsageError("--bf16-update applies to --dtype bfloat16 only")
  if args.embedded_hidden % 4:
    raise UsageError("--embedded-hidden must be a multiple of 4 (the model has 4 heads)")
  if args.resume and not args.checkpoint_dir:
    raise UsageError("--resume needs --checkpoint-dir")
  for flag in ("log", "json", "plot", "pretrained_cache"):
    _check_output_file(f"--{flag.replace('_', '-')}", getattr(args, flag))
  if args.checkpoint_dir:
    _check_output_dir("--checkpoint-dir", args.checkpoint_dir)


def _resolve_defaults(args: argparse.Namespace) -> None:
  """Fills the settings left to the program from `DEFAULTS`."""
  setting = "embedded" if args.model_dir is None else "pretrained"
  defaults = DEFAULTS[setting].get(args.optimizer, {})
  for name in ("lr", "rank", "refresh_every", "vector_lr"):
    if getattr(args, name) is None and name in defaults:
      setattr(args, name, defaults[name])
  if args.steps is None:
    args.steps = STEPS[setting]
  if args.eval_every is None:
    args.eval_every = EVAL_EVERY[setting]
  if args.dtype == "bfloat16" and args.bf16_update is None:
    args.bf16_update = "master"


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Data parallelism over every visible device: batch rows split, the rest replicated."""

  mesh: Mesh

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.device_put(np.asarray(v), self.batch) for k, v in batch.items()}

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


@dataclasses.dataclass
class Setup:
  """The model, tokenizer and encoded data of a run, all checked before training.

  Attributes:
    config: the decoder's architecture.
    tokenizer: its tokenizer.
    task: the prompt task.
    label_ids: ``(num_classes,)`` token ids of the label words.
    train, dev, eval: encoded splits (`tasks.encode_batch` arrays: input_ids,
      attention_mask, positions, labels); ``dev`` may have no rows.
    load_params: returns the initial parameters (reads the weights, or
      pretrains the embedded default); called only when not resuming.
    description: facts for the summary (sizes, sources).
  """

  config: model_lib.DecoderConfig
  tokenizer: Any
  task: tasks_lib.PromptTask
  label_ids: np.ndarray
  train: dict
  dev: dict
  eval: dict
  load_params: Callable[[], Any]
  description: dict


def _special_ids(model_dir: str, config: model_lib.DecoderConfig, tokenizer) -> tuple:
  """``(bos_id, pad_id)`` for the prompts of a Hugging Face model.

  BOS: the one token the tokenizer's post-processor puts before every text
  (Llama's ``<|begin_of_text|>`` or ``<s>``; Qwen's adds none), as MeZO's
  encoding keeps what the tokenizer adds. OPT's Python tokenizer prepends
  ``</s>`` itself, which a ``tokenizer.json`` may not record, so for OPT the
  config's ``bos_token_id`` (2) is used when the post-processor adds nothing.
  PAD: the config's ``pad_token_id``, else 0 (padded positions are masked out,
  so any id in the vocabulary will do).
  """
  with open(os.path.join(model_dir, "config.json")) as f:
    hf = json.load(f)
  bos = None
  plain = tokenizer.encode("a", add_special_tokens=False).ids
  full = tokenizer.encode("a", add_special_tokens=True).ids
  if len(full) == len(plain) + 1 and full[1:] == plain:
    bos = int(full[0])
  elif config.family == "opt" and isinstance(hf.get("bos_token_id"), int):
    bos = int(hf["bos_token_id"])
  pad = hf.get("pad_token_id")
  return bos, int(pad) if isinstance(pad, int) else 0


def _load_examples(args, task) -> data_lib.Splits:
  """MeZO's train / dev / eval samples of the task (generated, or read from --data-dir)."""
  if args.data_dir is None:  # synthetic-sst2 without files: the generated splits
    train_pool = synthetic.generate_task(SYNTHETIC_TRAIN_SIZE, SYNTHETIC_SPLIT_SEEDS["train"])
    validation_pool = synthetic.generate_task(
      SYNTHETIC_VALIDATION_SIZE, SYNTHETIC_SPLIT_SEEDS["validation"]
    )
  else:
    train_pool = data_lib.load_split(task, args.data_dir, "train")
    validation_pool = data_lib.load_split(task, args.data_dir, "validation")
  if args.k_shot is None:
    return data_lib.split_train_dev_test(
      train_pool, validation_pool, args.num_train, args.num_dev, args.num_eval, args.seed
    )
  # k per class from what the dev set leaves of the training split.
  rest = data_lib.split_train_dev_test(
    train_pool, validation_pool, len(train_pool), args.num_dev, args.num_eval, args.seed
  )
  return data_lib.Splits(
    data_lib.sample_k_shot(rest.train, args.k_shot, args.seed), rest.dev, rest.test
  )


def _encode_splits(args, task, tokenizer, splits, pad_id, bos_id) -> tuple[dict, dict, dict]:
  """The three splits encoded in one call: one padded length, so one compiled shape each."""
  examples = [*splits.train, *splits.dev, *splits.test]
  try:
    arrays = tasks_lib.encode_batch(
      task,
      tokenizer,
      examples,
      args.max_length,
      pad_id,
      bos_id=bos_id,
      pad_to_multiple_of=PAD_MULTIPLE,
    )
  except (KeyError, ValueError) as e:
    raise UsageError(str(e).strip("\"'")) from None
  cuts = np.cumsum([len(splits.train), len(splits.dev)])
  parts = [{k: np.split(v, cuts)[i] for k, v in arrays.items()} for i in range(3)]
  return parts[0], parts[1], parts[2]


def build_setup(args, log: Callable[[str], None]) -> Setup:
  """Model config, tokenizer, label words and encoded data, with every input checked.

  Nothing heavy is done here (no weights read, no pretraining): what can fail
  does so before any output is written.

  Raises:
    UsageError: a missing or unsupported model directory, a label word that is
      not one token, missing or malformed data.
  """
  task = tasks_lib.get_task(args.task)
  dtype = jnp.dtype(args.dtype)
  scan = args.layout == "scan"
  if args.model_dir is not None:
    try:
      config = checkpoint_lib.load_config(args.model_dir)
      tokenizer = checkpoint_lib.load_tokenizer(args.model_dir)
    except (FileNotFoundError, ValueError, KeyError) as e:
      message = f"config.json has no {e.args[0]!r} entry" if isinstance(e, KeyError) else e
      raise UsageError(f"--model-dir {args.model_dir}: {message}") from None
    limit = HF_MAX_LENGTH if config.family != "opt" else min(HF_MAX_LENGTH, config.max_positions)
    if args.max_length is None:
      args.max_length = limit
    bos_id, pad_id = _special_ids(args.model_dir, config, tokenizer)
    description = {
      "model": os.path.abspath(args.model_dir),
      "model_type": config.model_type,
      "bos_id": bos_id,
    }

    def load_params():
      try:
        return checkpoint_lib.load_params(args.model_dir, config, dtype, scan_layers=scan)
      except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--model-dir {args.model_dir}: {e}") from None

  else:
    tokenizer = pretrain_lib.build_tokenizer(args.seed)
    config = pretrain_lib.embedded_config(
      tokenizer.get_vocab_size(), args.embedded_hidden, args.embedded_layers
    )
    if args.max_length is None:
      args.max_length = EMBEDDED_MAX_LENGTH
    bos_id, pad_id = synthetic.BOS_ID, synthetic.PAD_ID
    description = {"model": "embedded", "model_type": "opt", "bos_id": bos_id}
    settings = pretrain_lib.PretrainSettings(
      steps=args.pretrain_steps, batch_size=args.pretrain_batch_size, seed=args.seed
    )
    key = pretrain_lib.cache_key(config, settings)
    if args.pretrained_cache and os.path.exists(args.pretrained_cache):
      try:
        pretrain_lib.load_cache(args.pretrained_cache, config, key)
      except pretrain_lib.CacheMismatchError as e:
        raise UsageError(f"--pretrained-cache: {e}") from None

    def load_params():
      params = _embedded_params(args, config, tokenizer, settings, key, log, description)
      params = jax.tree.map(lambda x: x.astype(dtype), params)
      return model_lib.stack_layers(params) if scan else params

  if config.family == "opt" and args.max_length > config.max_positions:
    raise UsageError(
      f"--max-length {args.max_length} exceeds the model's {config.max_positions} positions"
    )
  if config.sliding_window is not None and args.max_length > config.sliding_window:
    raise UsageError(
      f"--max-length {args.max_length} exceeds the model's sliding window "
      f"({config.sliding_window}), which is not implemented"
    )
  try:
    label_ids = tasks_lib.label_token_ids(task, tokenizer)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if int(np.max(label_ids)) >= config.vocab_size:
    raise UsageError(
      f"label token ids {label_ids.tolist()} are outside the model's vocabulary "
      f"({config.vocab_size}): tokenizer.json does not belong to this model"
    )
  try:
    splits = _load_examples(args, task)
  except data_lib.DataError as e:
    raise UsageError(str(e)) from None
  if not splits.train or not splits.test:
    raise UsageError("no training or eval examples: check --num-train, --k-shot, --num-eval")
  train, dev, evaluation = _encode_splits(args, task, tokenizer, splits, pad_id, bos_id)
  description.update(
    num_train=len(splits.train),
    num_dev=len(splits.dev),
    num_eval=len(splits.test),
    sequence_length=int(train["input_ids"].shape[1]),
  )
  return Setup(config, tokenizer, task, label_ids, train, dev, evaluation, load_params, description)


def _embedded_params(args, config, tokenizer, settings, key, log, description):
  """The pretrained embedded default: from --pretrained-cache, or pretrained now."""
  if args.pretrained_cache and os.path.exists(args.pretrained_cache):
    params, extras = pretrain_lib.load_cache(args.pretrained_cache, config, key)
    description["pretrain_loss"] = extras.get("loss")
    log(f"pretrained model read from {args.pretrained_cache}")
    return params
  bar = None
  if not args.quiet and settings.steps:
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.steps, desc="pretrain (Adam)", unit="step", file=sys.stderr)

  def progress(step, loss):
    if bar is not None:
      bar.update(1)
      if math.isfinite(loss):
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

  start = time.perf_counter()
  params, loss = pretrain_lib.pretrain(config, tokenizer, settings, progress)
  seconds = time.perf_counter() - start
  if bar is not None:
    bar.close()
  description.update(pretrain_loss=loss, pretrain_seconds=round(seconds, 2))
  log(
    f"pretrained with Adam on the synthetic corpus ({settings.steps} steps of "
    f"{settings.batch_size} documents, {model_lib.param_count(params)} parameters, "
    f"{seconds:.1f} s): causal-LM loss {loss:.3f}"
  )
  if args.pretrained_cache:
    pretrain_lib.save_cache(args.pretrained_cache, params, key, {"loss": loss})
  return params


def make_loss(config: model_lib.DecoderConfig, label_ids: np.ndarray):
  """``(params, batch) -> loss``: cross-entropy over the label words' logits, in float32."""
  token_ids = jnp.asarray(label_ids, jnp.int32)

  def loss_fn(params, batch):
    logits = model_lib.label_logits(
      params,
      config,
      batch["input_ids"],
      batch["attention_mask"],
      batch["positions"],
      token_ids,
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  return loss_fn


def zo_loss(opt_state) -> jax.Array:
  """The loss a zojax state saw in its last step (outermost estimator or block state)."""
  nodes = (zojax.ZOGradState, zojax.BlockCoordinateState)
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, nodes)):
    if isinstance(node, nodes):
      return node.loss
  raise ValueError("the optimizer state holds no zojax estimator")


# Compiled programs of earlier runs in this process (tests, sweeps calling `train` repeatedly),
# keyed by everything that defines them: run settings, architecture, label words, shapes and
# devices. A run's step is a function of those alone; its data and weights are arguments.
_COMPILED: dict[str, Any] = {}
_PREDICT: dict[str, Any] = {}
_MAX_CACHED = 4


def _compiled_step(description: dict, build: Callable[[], Any], example: tuple):
  """``build()``'s jitted step lowered and compiled for ``example``, reused when seen before."""
  shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype), str(x.sharding)), example)
  key = json.dumps({**description, "shapes": str(shapes)}, sort_keys=True, default=str)
  if key not in _COMPILED:
    while len(_COMPILED) >= _MAX_CACHED:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = build().lower(*example).compile()
  return _COMPILED[key]


def make_train_step(loss_fn, optimizer: optimizers.Optimizer):
  """The jitted step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

  Parameters and optimizer state are donated. A ZO step evaluates the loss
  through ``value_fn``; the loss reported is the optimizer's own (no extra
  forward pass). A backprop step uses `jax.value_and_grad`.
  """
  tx = optimizer.tx

  def step(params, opt_state, batch):
    if optimizer.zeroth_order:
      updates, opt_state = tx.update(None, opt_state, params, value_fn=lambda p: loss_fn(p, batch))
      loss = zo_loss(opt_state)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def make_predict(config: model_lib.DecoderConfig, label_ids: np.ndarray, shardings: Shardings):
  """The jitted ``(params, batch) -> class predictions``: argmax over the label words' logits."""
  key = json.dumps(
    {
      "model": dataclasses.asdict(config),
      "labels": np.asarray(label_ids).tolist(),
      "devices": [d.id for d in shardings.mesh.devices.flat],
    },
    sort_keys=True,
  )
  if key not in _PREDICT:
    token_ids = jnp.asarray(label_ids, jnp.int32)

    def predict(params, batch):
      logits = model_lib.label_logits(
        params, config, batch["input_ids"], batch["attention_mask"], batch["positions"], token_ids
      )
      return jnp.argmax(logits, axis=-1)

    _PREDICT[key] = jax.jit(predict, out_shardings=shardings.replicated)
  return _PREDICT[key]


def accuracy_fn(predict, arrays: dict, batch_size: int, shardings: Shardings):
  """Returns ``params -> accuracy`` of ``predict`` over ``arrays``, in padded batches.

  The last batch is filled with empty rows (no real token, label -1) so that
  every batch has the one compiled shape and splits over the devices. An
  empty split gives None.
  """
  n = len(arrays["labels"])
  padded = -(-n // batch_size) * batch_size
  filled = {}
  for k, v in arrays.items():
    fill = np.full((padded - n, *v.shape[1:]), -1 if k == "labels" else 0, v.dtype)
    filled[k] = np.concatenate([v, fill])

  def evaluate(params) -> float | None:
    if n == 0:
      return None
    correct = 0
    for start in range(0, padded, batch_size):
      batch = {k: v[start : start + batch_size] for k, v in filled.items()}
      pred = np.asarray(predict(params, shardings.put_batch(batch)))
      correct += int(np.sum(pred == batch["labels"]))
    return correct / n

  return evaluate


def batch_rows(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Training rows of step ``step`` (0-based): a pure function of its arguments.

  The examples are read as a stream of epochs, epoch ``e`` in the order
  ``numpy.random.default_rng([seed, e]).permutation``; step ``t`` takes the
  stream's items ``t * batch_size`` to ``(t + 1) * batch_size - 1`` (a batch
  may span two epochs). The data position of a run is its step count, which
  the checkpoint holds, so a resumed run reads the same batches.
  """
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = positions // num_examples
  rows = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    here = epochs == epoch
    rows[here] = order[positions[here] % num_examples]
  return rows


def run_config(args, optimizer: optimizers.Optimizer) -> dict:
  """What must match for a checkpoint to be resumed: model, data and optimizer settings."""
  keys = (
    "model_dir",
    "task",
    "data_dir",
    "num_train",
    "num_dev",
    "num_eval",
    "k_shot",
    "max_length",
    "layout",
    "dtype",
    "bf16_update",
    "optimizer",
    "lr",
    "eps",
    "rank",
    "num_queries",
    "refresh_every",
    "vector_lr",
    "batch_size",
    "seed",
  )
  config = {k: getattr(args, k) for k in keys}
  for k in ("model_dir", "data_dir"):
    if config[k] is not None:
      config[k] = os.path.abspath(config[k])
  if args.model_dir is None:
    config.update(
      pretrain_steps=args.pretrain_steps,
      pretrain_batch_size=args.pretrain_batch_size,
      embedded_hidden=args.embedded_hidden,
      embedded_layers=args.embedded_layers,
    )
  config["forwards_per_step"] = optimizer.forwards_per_step
  return config


def _plot(history: list[dict], path: str, title: str) -> None:
  """Eval (and dev) accuracy against forward passes and against training time.

  ``history`` starts with the accuracy before fine-tuning (step 0).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  for ax, key, label in (
    (axes[0], "forwards", "forward passes"),
    (axes[1], "seconds", "training time (s)"),
  ):
    x = [h[key] for h in history]
    ax.plot(x, [h["eval_accuracy"] for h in history], marker="o", label="eval")
    if any(h.get("dev_accuracy") is not None for h in history):
      ax.plot(x, [h["dev_accuracy"] for h in history], marker=".", ls="--", label="dev")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _open_manager(directory: str):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=2)
  )


def train(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[dict, Any]:
  """Runs (or resumes) one fine-tuning run; returns its summary and final parameters.

  Raises:
    UsageError: for settings, models or data that cannot work, before any
      output is written.
    zojax.checkpointing.CheckpointMismatchError: if --resume finds a
      checkpoint of another model, data or optimizer configuration.
    zojax.checkpointing.CheckpointCorruptedError: if --resume finds no
      intact checkpoint.
  """
  devices = jax.devices()
  _resolve_defaults(args)
  _check_args(args, len(devices))
  try:  # the presets check their hyperparameters and name the one at fault
    optimizer = optimizers.make(
      args.optimizer,
      args.lr,
      eps=args.eps,
      num_queries=args.num_queries,
      rank=args.rank,
      refresh_every=args.refresh_every,
      vector_learning_rate=args.vector_lr,
      seed=args.seed,
      low_precision=args.bf16_update,
    )
  except (ValueError, TypeError) as e:
    raise UsageError(f"--optimizer {args.optimizer}: {e}") from None
  if args.forward_budget is not None and args.forward_budget < optimizer.forwards_per_step:
    raise UsageError(
      f"--forward-budget {args.forward_budget} is smaller than one {args.optimizer} step "
      f"({optimizer.forwards_per_step} forward passes)"
    )
  setup = build_setup(args, log)
  shardings = Shardings(Mesh(np.array(devices), ("data",)))
  config = run_config(args, optimizer)
  dtype = jnp.dtype(args.dtype)
  params_t = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
    model_lib.param_shapes(setup.config, dtype, scan_layers=args.layout == "scan"),
  )
  state_t = jax.eval_shape(optimizer.tx.init, params_t)  # also checks the blocks / subspaces

  manager = None
  resumed = None
  if args.resume:
    from zojax import checkpointing

    if not os.path.isdir(args.checkpoint_dir):
      raise UsageError(f"--resume: no checkpoint directory {args.checkpoint_dir}")
    try:
      found = checkpointing.restore_latest_intact(
        args.checkpoint_dir, params_t, state_t, config=config
      )
    except FileNotFoundError:
      raise UsageError(f"--resume: no checkpoint in {args.checkpoint_dir}") from None
    params, opt_state, meta, damaged = found
    resumed = meta["extras"]

  loss_fn = make_loss(setup.config, setup.label_ids)
  predict = make_predict(setup.config, setup.label_ids, shardings)
  evaluate_eval = accuracy_fn(predict, setup.eval, args.batch_size, shardings)
  evaluate_dev = accuracy_fn(predict, setup.dev, args.batch_size, shardings)
  num_train = len(setup.train["labels"])
  if resumed is None:
    params = shardings.replicate(setup.load_params())
    opt_state = optimizer.tx.init(params)
    progress_state = {"step": 0, "forwards": 0, "seconds": 0.0, "history": []}
    accuracy_before = evaluate_eval(params)
    dev_before = evaluate_dev(params)
    dev_text = "" if dev_before is None else f" (dev {dev_before:.4f})"
    log(f"before fine-tuning ({args.optimizer}): eval accuracy {accuracy_before:.4f}{dev_text}")
  else:
    progress_state = resumed["progress"]
    accuracy_before = resumed["accuracy_before"]
    dev_before = resumed["dev_accuracy_before"]
    if resumed["data_position"] != progress_state["step"] * args.batch_size:
      raise UsageError("--resume: the checkpoint's data position does not match its step")
    log(f"resumed from step {progress_state['step']} in {args.checkpoint_dir}")
  params = shardings.replicate(params)
  opt_state = shardings.replicate(opt_state)

  # Everything that can fail has been checked: now outputs may be written.
  if resumed is not None:
    for step, reason in damaged:
      kept = set_aside(args.checkpoint_dir, step)
      print(
        f"warning: --resume: {reason}\n  kept it as {kept}; resuming from step {meta['step']}",
        file=sys.stderr,
      )
    if args.log:
      dropped = trim_log(args.log, resumed.get("log"))
      if dropped:
        log(f"dropped {dropped} lines after step {progress_state['step']} from {args.log}")
  if manager is None and args.checkpoint_dir:
    manager = _open_manager(args.checkpoint_dir)
  log_file = open(args.log, "a") if args.log else None  # noqa: SIM115

  def save():
    if manager is None or manager.latest_step() == progress_state["step"]:
      return
    from zojax import checkpointing

    extras = {
      "progress": progress_state,
      "data_position": progress_state["step"] * args.batch_size,
      "accuracy_before": accuracy_before,
      "dev_accuracy_before": dev_before,
      # Where the log stood, so that a resumed run drops the lines logged after this step.
      "log": None
      if log_file is None
      else {"path": os.path.abspath(args.log), "bytes": os.fstat(log_file.fileno()).st_size},
    }
    checkpointing.save(
      manager, progress_state["step"], params, opt_state, config=config, extras=extras
    )

  def record(loss):
    accuracy = evaluate_eval(params)
    entry = {
      "step": progress_state["step"],
      "forwards": progress_state["forwards"],
      "seconds": round(progress_state["seconds"], 3),
      "loss": loss if math.isfinite(loss) else None,
      "eval_accuracy": accuracy,
      "dev_accuracy": evaluate_dev(params),
    }
    progress_state["history"].append(entry)
    if log_file:
      log_file.write(json.dumps(entry) + "\n")
      log_file.flush()
    return accuracy

  def batch_at(step: int) -> dict:
    rows = batch_rows(step, num_train, args.batch_size, args.seed)
    return shardings.put_batch({k: v[rows] for k, v in setup.train.items()})

  compile_start = time.perf_counter()
  compiled = _compiled_step(
    {"run": config, "model": dataclasses.asdict(setup.config), "labels": setup.label_ids.tolist()},
    lambda: make_train_step(loss_fn, optimizer),
    (params, opt_state, batch_at(0)),
  )
  compile_seconds = time.perf_counter() - compile_start

  bar = None
  if not args.quiet:
    from tqdm.auto import tqdm

    bar = tqdm(
      total=args.steps,
      initial=progress_state["step"],
      desc=args.optimizer,
      unit="step",
      file=sys.stderr,
    )
  budget = math.inf if args.forward_budget is None else args.forward_budget
  max_time = math.inf if args.max_time is None else args.max_time
  history = progress_state["history"]
  accuracy = history[-1]["eval_accuracy"] if history else None
  loss_value = jnp.float32(math.nan)
  stop = "steps"
  while progress_state["step"] < args.steps:
    if progress_state["forwards"] + optimizer.forwards_per_step > budget:
      stop = "forward budget"
      break
    if progress_state["seconds"] >= max_time:
      stop = "time"
      break
    batch = batch_at(progress_state["step"])
    t0 = time.perf_counter()
    params, opt_state, loss_value = compiled(params, opt_state, batch)
    jax.block_until_ready(params)
    progress_state["seconds"] += time.perf_counter() - t0
    progress_state["step"] += 1
    progress_state["forwards"] += optimizer.forwards_per_step
    step = progress_state["step"]
    if step % args.eval_every == 0 or step == args.steps:
      accuracy = record(float(loss_value))
    if manager is not None and step % args.checkpoint_every == 0:
      save()
    if bar is not None:
      bar.update(1)
      if step % 10 == 0 or step % args.eval_every == 0:
        bar.set_postfix(
          loss=f"{float(loss_value):.4f}",
          acc="-" if accuracy is None else f"{accuracy:.3f}",
          fwd=str(progress_state["forwards"]),
          refresh=False,
        )
  if bar is not None:
    bar.close()
  if not history or history[-1]["step"] != progress_state["step"]:
    record(float(loss_value))
  save()
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if log_file:
    log_file.close()
  last = history[-1]
  dev_points = [h for h in history if h["dev_accuracy"] is not None]
  best = max(dev_points, key=lambda h: h["dev_accuracy"]) if dev_points else None
  summary = {
    "optimizer": args.optimizer,
    "task": args.task,
    "accuracy_before": accuracy_before,
    "accuracy_after": last["eval_accuracy"],
    "dev_accuracy_before": dev_before,
    "dev_accuracy_after": last["dev_accuracy"],
    "best_dev": None
    if best is None
    else {k: best[k] for k in ("step", "dev_accuracy", "eval_accuracy")},
    "steps": progress_state["step"],
    "forward_passes": progress_state["forwards"],
    "train_seconds": round(progress_state["seconds"], 2),
    "compile_seconds": round(compile_seconds, 2),
    "stopped_by": stop,
    "devices": len(devices),
    "num_params": model_lib.param_count(params),
    "config": config,
    **setup.description,
  }
  if args.plot:
    start = {"forwards": 0, "seconds": 0.0, "eval_accuracy": accuracy_before}
    start["dev_accuracy"] = dev_before
    _plot([start, *history], args.plot, f"{args.optimizer} on {args.task}")
  log(
    f"after {summary['steps']} {args.optimizer} steps ({summary['forward_passes']} forward "
    f"passes, {summary['train_seconds']:.1f} s + {summary['compile_seconds']:.1f} s compile): "
    f"eval accuracy {summary['accuracy_before']:.4f} -> {summary['accuracy_after']:.4f}"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
  return summary, params


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit code."""
  args = parse_args(argv)
  log = (lambda *_: None) if args.quiet else print
  try:
    train(args, log)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    from zojax.checkpointing import CheckpointCorruptedError, CheckpointMismatchError

    if isinstance(e, (CheckpointMismatchError, CheckpointCorruptedError)):
      print(f"error: --resume: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
