"""MeZO step time on a ViT: zojax against a PyTorch MeZO written as the reference code does.

Builds the example's linen ViT (``examples/vit_cifar100/model.py``, ViT-S/16
by default) and the same architecture in plain ``torch.nn`` (conv patch
embedding, cls token, learnt position embedding, pre-LN blocks with
multi-head self-attention and a tanh-GELU MLP, final LayerNorm, head on the
cls token), copies the flax parameters into the torch modules and checks,
before any timing, that both forwards give the same logits on the same batch
(the largest absolute difference relative to the logits' scale is printed;
the run stops if it exceeds ``--tolerance``). ``create`` leaves the head at
zero, which would make that check vacuous, so the head is drawn at random.

The two MeZO steps (one Gaussian direction, weight decay 0, the same
``eps`` and learning rate) are

* zojax: ``zojax.mezo`` through the ViT example's train step
  (``examples.vit_cifar100.train.make_train_step``: one jitted step,
  parameter and optimizer-state buffers donated), run by XLA on the CPU with
  its default threading;
* PyTorch: MeZO-SGD as princeton-nlp/MeZO's trainer writes it
  (``zo_perturb_parameters`` / ``zo_step`` / ``zo_update``, arXiv
  2305.17333): draw a seed, ``torch.manual_seed(seed)`` and add ``eps * z``
  to every parameter in place, with ``z = torch.normal(0, 1, ...)`` drawn per
  parameter; the loss under ``torch.inference_mode``; reseed, perturb by
  ``-2 eps z``, the second loss; reseed, ``+eps z`` to restore;
  ``projected_grad = (loss1 - loss2) / (2 eps)``; reseed and subtract
  ``lr * projected_grad * z``. ``z`` is regenerated four times per step.
  Eager execution on the CPU with ``torch.set_num_threads(os.cpu_count())``.

For each batch size both sides are warmed up (the zojax step compiled), then
the zojax step, the torch step, each side's plain forward (the loss) and one
torch perturbation pass (``z`` regenerated and added once, the sign
alternating so the weights come back) are timed in alternation,
``--repeats`` rounds, so machine noise hits them alike. Reported
per batch size: the medians, ``torch step / zojax step`` (the speedup; the
target is >= 2x), each side's ``step / forward`` (2 would mean a step costs
its two forward passes and nothing else) and the share of the torch step
spent regenerating ``z``. Absolute times vary between machines and runs; only
ratios measured in one process are compared.

Other work on the machine slows torch's OpenMP threads far more than XLA's
(each small op waits at a barrier for a thread the OS has descheduled): on a
2-core machine with another busy process, a LayerNorm of a ``16 x 17 x 384``
batch took 8 ms with 2 torch threads and 0.06 ms with 1. Run it on an idle
machine, or compare with ``--torch-threads 1``; the load average at the start
and end is recorded in the JSON.

Needs PyTorch's CPU build, the optional ``bench`` extra: ``pip install -e
".[bench]"``. ``--quick`` keeps ViT-S/16's widths (384 wide, 6 heads, MLP
1536) but runs 4 of its 12 blocks at 64 px (16 patches + cls), so it finishes
in a few minutes on a 2-core CPU (most of it compiling the two zojax steps);
parameter work and forward work both scale with the depth, so the ratios
change little with it. The default, all 12 blocks at 224 px (196 patches +
cls), is for a bigger machine.

Example:
  python -m benchmarks.torch_mezo --quick --out /tmp/torch_mezo.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from examples.vit_cifar100 import model as model_lib
from examples.vit_cifar100 import optimizers, train

try:  # the optional `bench` extra
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError:
  torch = None

TARGET_SPEEDUP = 2.0
INSTALL_HINT = 'PyTorch is not installed; install the bench extra: pip install -e ".[bench]"'


if torch is not None:

  class TorchAttention(nn.Module):
    """Multi-head self-attention with separate query/key/value/out projections."""

    def __init__(self, hidden_size: int, num_heads: int):
      super().__init__()
      self.num_heads = num_heads
      self.query = nn.Linear(hidden_size, hidden_size)
      self.key = nn.Linear(hidden_size, hidden_size)
      self.value = nn.Linear(hidden_size, hidden_size)
      self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      b, t, d = x.shape
      heads = lambda y: y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
      q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
      y = F.scaled_dot_product_attention(q, k, v)  # scales by 1 / sqrt(head_dim)
      return self.out(y.transpose(1, 2).reshape(b, t, d))

  class TorchBlock(nn.Module):
    """Pre-LN encoder block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, hidden_size: int, mlp_dim: int, num_heads: int):
      super().__init__()
      self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
      self.attn = TorchAttention(hidden_size, num_heads)
      self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
      self.fc1 = nn.Linear(hidden_size, mlp_dim)
      self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      x = x + self.attn(self.norm1(x))
      return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

  class TorchViT(nn.Module):
    """The example's ViT in ``torch.nn``: ``(B, C, H, W)`` images -> ``(B, classes)`` logits."""

    def __init__(self, config: model_lib.Config, num_classes: int, image_size: int):
      super().__init__()
      d = config.hidden_size
      tokens = 1 + model_lib.grid_size(image_size, config.patch_size) ** 2
      p = config.patch_size
      self.embedding = nn.Conv2d(config.channels, d, kernel_size=p, stride=p)
      self.cls = nn.Parameter(torch.zeros(1, 1, d))
      self.pos_embedding = nn.Parameter(torch.zeros(1, tokens, d))
      self.blocks = nn.ModuleList(
        TorchBlock(d, config.mlp_dim, config.num_heads) for _ in range(config.num_layers)
      )
      self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
      rep = config.representation_size
      self.pre_logits = None if rep is None else nn.Linear(d, rep)
      self.head = nn.Linear(d if rep is None else rep, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
      x = self.embedding(images).flatten(2).transpose(1, 2)  # row-major grid of patches
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
      for block in self.blocks:
        x = block(x)
      x = self.encoder_norm(x)[:, 0]
      if self.pre_logits is not None:
        x = torch.tanh(self.pre_logits(x))
      return self.head(x)


def torch_state_dict(params: model_lib.Params, num_layers: int) -> dict[str, np.ndarray]:
  """The flax ViT parameters renamed and transposed into `TorchViT`'s ``state_dict`` layout.

  Args:
    params: the linen ``params`` collection of a `model_lib.VisionTransformer`.
    num_layers: its encoder blocks.

  Returns:
    ``state_dict`` key -> float32 array: conv kernels HWIO -> OIHW, dense
    kernels ``(in, out)`` -> ``(out, in)``, per-head attention kernels and
    biases flattened to ``D x D`` and ``D``.
  """
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  enc = p["Transformer"]
  dense = lambda layer: {"weight": layer["kernel"].T, "bias": layer["bias"]}
  norm = lambda layer: {"weight": layer["scale"], "bias": layer["bias"]}
  modules = {
    "embedding": {
      "weight": p["embedding"]["kernel"].transpose(3, 2, 0, 1),
      "bias": p["embedding"]["bias"],
    },
    "encoder_norm": norm(enc["encoder_norm"]),
    "head": dense(p["head"]),
  }
  if "pre_logits" in p:
    modules["pre_logits"] = dense(p["pre_logits"])
  for i in range(num_layers):
    block = enc[f"encoderblock_{i}"]
    attn = block["MultiHeadDotProductAttention_1"]
    prefix = f"blocks.{i}"
    for name in ("query", "key", "value"):  # kernel (D, heads, head_dim), bias (heads, head_dim)
      kernel = attn[name]["kernel"]
      modules[f"{prefix}.attn.{name}"] = {
        "weight": kernel.reshape(kernel.shape[0], -1).T,
        "bias": attn[name]["bias"].reshape(-1),
      }
    out = attn["out"]["kernel"]  # (heads, head_dim, D)
    modules[f"{prefix}.attn.out"] = {
      "weight": out.reshape(-1, out.shape[-1]).T,
      "bias": attn["out"]["bias"],
    }
    modules[f"{prefix}.norm1"] = norm(block["LayerNorm_0"])
    modules[f"{prefix}.norm2"] = norm(block["LayerNorm_2"])
    modules[f"{prefix}.fc1"] = dense(block["MlpBlock_3"]["Dense_0"])
    modules[f"{prefix}.fc2"] = dense(block["MlpBlock_3"]["Dense_1"])
  state = {f"{m}.{k}": v for m, leaves in modules.items() for k, v in leaves.items()}
  state["cls"] = p["cls"]
  state["pos_embedding"] = enc["posembed_input"]["pos_embedding"]
  return {k: np.array(v, order="C") for k, v in state.items()}  # writable copies


def load_flax_params(module: Any, params: model_lib.Params, num_layers: int) -> None:
  """Copies flax ViT parameters into a `TorchViT` (strict: every key and shape must match).

  Args:
    module: a `TorchViT` of the same config, class count and image size.
    params: the linen ``params`` collection.
    num_layers: encoder blocks.
  """
  state = {k: torch.from_numpy(v) for k, v in torch_state_dict(params, num_layers).items()}
  module.load_state_dict(state, strict=True)


class ReferenceMeZO:
  """MeZO-SGD as princeton-nlp/MeZO's trainer implements it (``zo_step`` + ``zo_update``).

  In-place perturbations regenerated from a seed: ``torch.manual_seed(seed)``
  then one ``torch.normal`` draw per parameter, four times per step (+1, -2
  and +1 times ``eps`` around the two losses, then the update). Weight decay
  is 0 here, as on the zojax side, so the reference's decay branch is left
  out; the in-place ``add_(z, alpha=...)`` is the reference's
  ``param.data = param.data + scale * z`` without the temporary copies.

  Args:
    model: the torch module; every parameter with ``requires_grad`` is trained.
    loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
    learning_rate: SGD learning rate.
    eps: perturbation scale.
    seed: seed of the per-step seeds (the reference draws them with numpy).
  """

  def __init__(self, model, loss_fn, learning_rate: float, eps: float, seed: int = 0):
    self.model = model
    self.loss_fn = loss_fn
    self.learning_rate = learning_rate
    self.eps = eps
    self.named_parameters_to_optim = [
      (n, p) for n, p in model.named_parameters() if p.requires_grad
    ]
    self._seeds = np.random.default_rng(seed)
    self.zo_random_seed = 0
    self.projected_grad = 0.0

  def zo_perturb_parameters(self, scaling_factor: float = 1.0) -> None:
    """``theta += scaling_factor * eps * z``, ``z`` regenerated from ``zo_random_seed``."""
    torch.manual_seed(self.zo_random_seed)
    for _, param in self.named_parameters_to_optim:
      z = torch.normal(
        mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype
      )
      param.data.add_(z, alpha=scaling_factor * self.eps)

  def zo_forward(self, batch) -> torch.Tensor:
    """The loss at the current parameters, without autograd."""
    self.model.eval()
    with torch.inference_mode():
      return self.loss_fn(self.model, batch).detach()

  def zo_step(self, batch) -> torch.Tensor:
    """Both perturbed losses and the projected gradient; parameters restored after."""
    self.zo_random_seed = int(self._seeds.integers(1_000_000_000))
    self.zo_perturb_parameters(scaling_factor=1)
    loss1 = self.zo_forward(batch)
    self.zo_perturb_parameters(scaling_factor=-2)
    loss2 = self.zo_forward(batch)
    self.projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
    self.zo_perturb_parameters(scaling_factor=1)
    return loss1

  def zo_update(self) -> None:
    """``theta -= lr * projected_grad * z``, ``z`` regenerated once more."""
    torch.manual_seed(self.zo_random_seed)
    for _, param in self.named_parameters_to_optim:
      z = torch.normal(
        mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype
      )
      param.data.add_(z, alpha=-self.learning_rate * self.projected_grad)

  def step(self, batch) -> float:
    """One MeZO step; returns the first perturbed loss."""
    with torch.no_grad():
      loss1 = self.zo_step(batch)
      self.zo_update()
    return float(loss1)


class ZojaxStepper:
  """The ViT example's jitted, donating zojax MeZO step, holding its params and state.

  Args:
    apply: ``logits(params, images)``.
    params: initial parameters (copied; the copies are donated step by step).
    learning_rate: SGD learning rate.
    eps: perturbation scale.
    seed: the optimizer's seed.
  """

  def __init__(self, apply, params, learning_rate: float, eps: float, seed: int = 0):
    optimizer = optimizers.make("mezo", learning_rate, eps=eps, seed=seed)
    self._step = train.make_train_step(apply, optimizer)
    self.params = jax.tree.map(jnp.copy, params)
    self.state = optimizer.tx.init(self.params)

  def __call__(self, batch):
    self.params, self.state, _ = self._step(self.params, self.state, batch)
    return self.params


def torch_loss(model, batch) -> torch.Tensor:
  """Mean softmax cross-entropy of ``model`` on ``{"image": NCHW, "label"}``, in float32."""
  return F.cross_entropy(model(batch["image"]).float(), batch["label"])


def make_batch(batch_size: int, image_size: int, channels: int, num_classes: int, seed: int):
  """The same random batch for both sides: images in ``[-1, 1]``, random labels.

  Returns:
    ``(jax_batch, torch_batch)``: ``{"image", "label"}`` dicts, images NHWC
    for JAX and NCHW (contiguous) for torch.
  """
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch_size, image_size, image_size, channels)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch_size)
  jax_batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}
  torch_batch = {
    "image": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
    "label": torch.from_numpy(labels.astype(np.int64)),
  }
  return jax_batch, torch_batch


def check_forwards(apply, params, torch_model, jax_batch, torch_batch) -> dict:
  """Logits and losses of both models on one batch, compared.

  Returns:
    ``max_abs_diff`` (largest absolute logit difference), ``logit_scale``
    (largest absolute JAX logit), ``relative`` (their ratio) and
    ``loss_diff`` (absolute difference of the two losses).
  """
  jax_logits = np.asarray(jax.jit(apply)(params, jax_batch["image"]))
  with torch.inference_mode():
    torch_logits = torch_model(torch_batch["image"]).numpy()
    torch_l = float(torch_loss(torch_model, torch_batch))
  jax_l = float(jax.jit(functools.partial(train.cross_entropy, apply))(params, jax_batch))
  diff = float(np.max(np.abs(jax_logits - torch_logits)))
  scale = float(np.max(np.abs(jax_logits)))
  return {
    "max_abs_diff": diff,
    "logit_scale": scale,
    "relative": diff / scale,
    "loss_diff": abs(jax_l - torch_l),
  }


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure_batch(args, cfg, apply, params, torch_model, batch_size: int) -> dict:
  """Checks the forwards agree, then times both MeZO steps and forwards at one batch size.

  Args:
    args: the parsed command line.
    cfg: the ViT's `model_lib.Config`.
    apply: ``logits(params, images)`` of the JAX model.
    params: its parameters (copied, not donated).
    torch_model: the `TorchViT` (its weights are reloaded from ``params``).
    batch_size: images per batch.

  Returns:
    One result row (a JSON-ready dict).
  """
  jax_batch, torch_batch = make_batch(
    batch_size, args.image_size, cfg.channels, args.num_classes, args.seed + batch_size
  )
  load_flax_params(torch_model, params, cfg.num_layers)  # both sides start from the same weights
  check = check_forwards(apply, params, torch_model, jax_batch, torch_batch)
  print(
    f"[batch {batch_size}] forward check: max |logit diff| {check['max_abs_diff']:.3e}"
    f" (logit scale {check['logit_scale']:.3f}, relative {check['relative']:.2e}),"
    f" |loss diff| {check['loss_diff']:.3e}",
    flush=True,
  )
  if not check["relative"] <= args.tolerance:
    raise SystemExit(
      f"the torch and JAX forwards disagree at batch {batch_size}: relative logit difference "
      f"{check['relative']:.2e} > --tolerance {args.tolerance:g}"
    )

  zojax_step = ZojaxStepper(apply, params, args.learning_rate, args.eps, seed=args.seed)
  reference = ReferenceMeZO(torch_model, torch_loss, args.learning_rate, args.eps, seed=args.seed)
  jax_forward = jax.jit(functools.partial(train.cross_entropy, apply))

  sign = [1.0]

  def torch_perturb_pass():
    with torch.no_grad():  # +eps z, then -eps z at the next call: the weights come back
      reference.zo_perturb_parameters(sign[0])
    sign[0] = -sign[0]

  fns = {
    "zojax_step": lambda: zojax_step(jax_batch),
    "torch_step": lambda: reference.step(torch_batch),
    "zojax_forward": lambda: jax_forward(zojax_step.params, jax_batch),
    "torch_forward": lambda: reference.zo_forward(torch_batch),
    "torch_perturb_pass": torch_perturb_pass,
  }
  print(f"[batch {batch_size}] compiling the zojax step and forward ...", flush=True)
  first_call_s = {
    "zojax_step": _timed(fns["zojax_step"]),
    "zojax_forward": _timed(fns["zojax_forward"]),
  }
  print(
    f"[batch {batch_size}] first calls {first_call_s['zojax_step']:.1f} s (step),"
    f" {first_call_s['zojax_forward']:.1f} s (forward); timing {args.repeats} rounds"
    f" after {args.warmup} warm-up ...",
    flush=True,
  )
  start = time.perf_counter()
  med = common.interleaved_medians(fns, args.repeats, warmup=args.warmup)
  pass_s = med.pop("torch_perturb_pass")
  speedup = med["torch_step"] / med["zojax_step"]
  row = {
    "batch": batch_size,
    "forward_check": check,
    "median_ms": {k: 1e3 * v for k, v in med.items()},
    "torch_perturb_pass_ms": 1e3 * pass_s,
    "first_call_s": first_call_s,
    "zojax_step_ms": 1e3 * med["zojax_step"],
    "torch_step_ms": 1e3 * med["torch_step"],
    "speedup": speedup,
    "zojax_step_over_forward": med["zojax_step"] / med["zojax_forward"],
    "torch_step_over_forward": med["torch_step"] / med["torch_forward"],
    "torch_forward_over_zojax_forward": med["torch_forward"] / med["zojax_forward"],
    "torch_z_share": 4 * pass_s / med["torch_step"],
    "target_met": speedup >= TARGET_SPEEDUP,
    "timing_s": time.perf_counter() - start,
  }
  print(
    f"[batch {batch_size}] zojax {row['zojax_step_ms']:.1f} ms/step, torch"
    f" {row['torch_step_ms']:.1f} ms/step: speedup {speedup:.2f}x",
    flush=True,
  )
  return row


COLUMNS = [
  ("batch", "batch", "d"),
  ("zojax_step_ms", "zojax step ms", ".1f"),
  ("torch_step_ms", "torch step ms", ".1f"),
  ("speedup", "torch/zojax", ".2f"),
  ("zojax_step_over_forward", "zojax step/fwd", ".2f"),
  ("torch_step_over_forward", "torch step/fwd", ".2f"),
  ("torch_forward_over_zojax_forward", "torch fwd/zojax fwd", ".2f"),
  ("torch_z_share", "torch z share", ".0%"),
  ("target", f">= {TARGET_SPEEDUP:g}x", "s"),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (``argv`` None reads `sys.argv`); ``--quick`` fills small defaults."""
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.torch_mezo",
    description=__doc__.split("\n\n")[0],
  )
  p.add_argument(
    "--model",
    default="S/16",
    help="ViT config from examples/vit_cifar100/model.py (default: %(default)s).",
  )
  p.add_argument(
    "--layers",
    type=int,
    default=None,
    help="encoder blocks (default: the config's; 4 with --quick).",
  )
  p.add_argument(
    "--image-size", type=int, default=None, help="input resolution (default 224; 64 with --quick)."
  )
  p.add_argument(
    "--batch-sizes",
    type=int,
    nargs="+",
    default=[16, 64],
    help="batch sizes (default: %(default)s).",
  )
  p.add_argument(
    "--num-classes",
    type=int,
    default=100,
    help="width of the head (default: %(default)s, CIFAR-100).",
  )
  p.add_argument(
    "--repeats", type=int, default=None, help="timed rounds (default 10; 5 with --quick)."
  )
  p.add_argument(
    "--warmup", type=int, default=None, help="untimed rounds (default 2; 1 with --quick)."
  )
  p.add_argument(
    "--learning-rate", type=float, default=1e-6, help="MeZO learning rate (default: %(default)s)."
  )
  p.add_argument(
    "--eps", type=float, default=1e-3, help="MeZO perturbation scale (default: %(default)s)."
  )
  p.add_argument(
    "--torch-threads", type=int, default=None, help="torch intra-op threads (default: all CPUs)."
  )
  p.add_argument(
    "--tolerance",
    type=float,
    default=1e-3,
    help="largest logit difference allowed, relative to the largest logit (default: %(default)s).",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the weights, batches and MeZO (default: %(default)s).",
  )
  p.add_argument(
    "--quick", action="store_true", help="4 blocks, 64 px, 5 rounds: minutes on 2 CPU cores."
  )
  p.add_argument("--out", default=None, help="write the results as JSON here.")
  args = p.parse_args(argv)
  if args.layers is None and args.quick:
    args.layers = 4
  if args.image_size is None:
    args.image_size = 64 if args.quick else 224
  if args.repeats is None:
    args.repeats = 5 if args.quick else 10
  if args.warmup is None:
    args.warmup = 1 if args.quick else 2
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark, prints the table and writes ``--out``.

  Args:
    argv: command-line arguments (None reads `sys.argv`).

  Returns:
    The results: config, model, environment (JAX and torch), one row per
    batch size and whether every batch size met the target speedup.
  """
  args = parse_args(argv)
  if torch is None:
    raise SystemExit(INSTALL_HINT)
  try:
    cfg = model_lib.get_config(args.model)
    if args.layers is not None:
      cfg = dataclasses.replace(cfg, num_layers=args.layers)
    model_lib.grid_size(args.image_size, cfg.patch_size)
  except ValueError as e:
    raise SystemExit(str(e)) from None
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  load_at_start = list(os.getloadavg())  # other work on the machine slows torch's threads most
  cpu = jax.devices("cpu")[0]  # torch runs on the CPU, so zojax does too

  with jax.default_device(cpu):
    model, params = model_lib.create(
      cfg, args.num_classes, args.image_size, key=jax.random.key(args.seed)
    )
    head = params["head"]["kernel"]  # zero after `create`: draw it so the logits say something
    params["head"]["kernel"] = jax.random.normal(
      jax.random.key(args.seed + 1), head.shape, head.dtype
    ) / np.sqrt(head.shape[0])
    apply = model_lib.make_logits(model)
    torch_model = TorchViT(cfg, args.num_classes, args.image_size).eval()
    num_params = model_lib.num_params(params)
    torch_params = sum(p.numel() for p in torch_model.parameters())
    if torch_params != num_params:
      raise SystemExit(f"parameter counts differ: torch {torch_params}, JAX {num_params}")
    tokens = 1 + model_lib.grid_size(args.image_size, cfg.patch_size) ** 2
    print(
      f"ViT-{args.model} ({cfg.num_layers} blocks) at {args.image_size} px ({tokens} tokens),"
      f" {num_params / 1e6:.1f}M parameters; jax {jax.__version__} on {cpu},"
      f" torch {torch.__version__} with {torch.get_num_threads()} threads",
      flush=True,
    )
    rows = [measure_batch(args, cfg, apply, params, torch_model, b) for b in args.batch_sizes]

  for row in rows:
    row["target"] = "yes" if row["target_met"] else "no"
  print()
  print(common.format_table(rows, COLUMNS), flush=True)
  env = common.environment()
  env.update(
    jax_device_used=str(cpu),
    torch=torch.__version__,
    torch_num_threads=torch.get_num_threads(),
    torch_num_interop_threads=torch.get_num_interop_threads(),
    torch_device="cpu",
    load_average_at_start=load_at_start,
    load_average_at_end=list(os.getloadavg()),
  )
  result = {
    "benchmark": "torch_mezo",
    "config": vars(args),
    "model": {
      "config": args.model,
      **dataclasses.asdict(cfg),
      "image_size": args.image_size,
      "tokens": tokens,
      "num_params": int(num_params),
    },
    "target_speedup": TARGET_SPEEDUP,
    "target_met": all(row["target_met"] for row in rows),
    "rows": rows,
    "environment": env,
  }
  common.write_json(result, args.out)
  if args.out:
    print(f"wrote {args.out}", file=sys.stderr)
  return result


if __name__ == "__main__":
  main()
