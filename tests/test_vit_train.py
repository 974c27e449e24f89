"""End-to-end tests of the ViT fine-tuning program (examples/vit_cifar100/train.py).

CIFAR-100 runs use ``tfds.testing.mock_data`` and the tiny "micro" ViT at
16 px; nothing is downloaded.
"""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from examples.vit_cifar100 import optimizers, train

MICRO = ["--dataset", "cifar100", "--model", "micro", "--image-size", "16", "--batch-size", "8"]


@pytest.fixture
def mock_cifar(tmp_path):
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    yield str(tmp_path / "tfds")


def _run(argv, log=lambda *_: None):
  return train.train(train.parse_args(argv), log)


# Small settings per optimizer so that every one compiles quickly.
SMALL = {
  "zo_muon": ["--rank", "2", "--num-queries", "2", "--refresh-every", "2"],
  "zo_mopi": ["--rank", "2", "--num-queries", "2", "--refresh-every", "2"],
  "lozo": ["--rank", "2"],
  "lozo_m": ["--rank", "2"],
  "subzero": ["--rank", "2"],
  "mezo_bcd": ["--refresh-every", "1"],
}


@pytest.mark.parametrize("name", optimizers.NAMES)
def test_every_optimizer_runs_a_few_steps(name, mock_cifar, tmp_path):
  log_path = tmp_path / "log.jsonl"
  summary, params = _run(
    MICRO
    + ["--data-dir", mock_cifar, "--optimizer", name, "--steps", "3", "--eval-every", "2"]
    + ["--log", str(log_path), "--quiet"]
    + SMALL.get(name, [])
  )
  assert summary["steps"] == 3
  assert (
    summary["forward_passes"]
    == 3 * optimizers.make(name, 0.1, **_small_kwargs(name)).forwards_per_step
  )
  chex.assert_tree_all_finite(params)
  entries = [json.loads(line) for line in log_path.read_text().splitlines()]
  assert [e["step"] for e in entries] == [2, 3]
  assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in entries)


def _small_kwargs(name):
  args = train.parse_args(SMALL.get(name, []))
  return {"num_queries": args.num_queries, "rank": args.rank, "refresh_every": args.refresh_every}


@pytest.mark.parametrize("name", ["mezo", "zo_muon"])
def test_resume_continues_bit_for_bit(name, mock_cifar, tmp_path):
  common = MICRO + ["--data-dir", mock_cifar, "--optimizer", name, "--quiet"] + SMALL.get(name, [])
  common += ["--eval-every", "100"]
  _, uninterrupted = _run(common + ["--steps", "6"])
  ckpt = str(tmp_path / "ckpt")
  first, _ = _run(common + ["--steps", "3", "--checkpoint-dir", ckpt])
  assert first["steps"] == 3
  second, resumed = _run(common + ["--steps", "6", "--checkpoint-dir", ckpt, "--resume"])
  assert second["steps"] == 6
  chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(uninterrupted))


def test_bad_input_is_one_clear_message(mock_cifar, tmp_path, capsys):
  base = MICRO + ["--data-dir", mock_cifar, "--steps", "2", "--quiet"]
  log_path = tmp_path / "log.jsonl"

  assert train.main(base + ["--optimizer", "sgd"]) == 2
  err = capsys.readouterr().err
  assert "unknown --optimizer 'sgd'" in err and "zo_muon" in err and "fo-adam" in err

  assert train.main(base + ["--optimizer", "mezo", "--forward-budget", "1"]) == 2
  assert "smaller than one mezo step (2 forward passes)" in capsys.readouterr().err

  # A checkpoint of another model configuration: refused before anything is written.
  ckpt = str(tmp_path / "ckpt")
  _run(base + ["--optimizer", "mezo", "--checkpoint-dir", ckpt])
  other = ["--model", "micro", "--image-size", "8"]
  code = train.main(
    base
    + other
    + ["--optimizer", "mezo", "--checkpoint-dir", ckpt, "--resume"]
    + ["--log", str(log_path)]
  )
  err = capsys.readouterr().err
  assert code == 2 and "--resume" in err and "pos_embedding" in err, err
  assert "Traceback" not in err
  assert not log_path.exists()


def test_missing_cifar100_exits_with_instructions(tmp_path, capsys):
  empty = tmp_path / "nothing_here"
  empty.mkdir()
  code = train.main(MICRO + ["--data-dir", str(empty), "--steps", "1", "--quiet"])
  err = capsys.readouterr().err
  assert code == 2
  assert "tfds build cifar100" in err and f"--data-dir {empty}" in err
  assert "Traceback" not in err


def test_digits_default_improves_accuracy(tmp_path):
  summary, _ = _run(
    ["--steps", "300", "--eval-every", "300", "--pretrain-steps", "200", "--quiet"]
    + ["--plot", str(tmp_path / "acc.png")]
  )
  assert summary["accuracy_before"] < 0.2  # zero head: one class everywhere
  assert summary["accuracy_after"] > summary["accuracy_before"] + 0.15
  assert summary["pretrain_accuracy"] > 0.8
  assert (tmp_path / "acc.png").stat().st_size > 1000


DATA_PARALLEL = textwrap.dedent(
  """
  import json, sys, jax, numpy as np, tensorflow_datasets as tfds
  from examples.vit_cifar100 import train
  argv = json.loads(sys.argv[1])
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    summary, params = train.train(train.parse_args(argv), lambda *_: None)
  leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(params))]
  np.save(sys.argv[2], np.concatenate(leaves))
  print(summary["devices"])
  """
)


def test_data_parallel_over_four_devices_matches_one(tmp_path):
  argv = MICRO + ["--data-dir", str(tmp_path / "tfds"), "--optimizer", "mezo", "--steps", "3"]
  argv += ["--quiet", "--eval-every", "100"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = {}
  for devices in (1, 4):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    out = tmp_path / f"params{devices}.npy"
    proc = subprocess.run(
      [sys.executable, "-c", DATA_PARALLEL, json.dumps(argv), str(out)],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(str(devices))
    results[devices] = np.load(out)
  np.testing.assert_allclose(results[4], results[1], rtol=2e-4, atol=2e-5)
  # A batch that does not split over the devices is refused.
  argv_bad = [a if a != "8" else "6" for a in argv]
  proc = subprocess.run(
    [sys.executable, "-m", "examples.vit_cifar100.train", *argv_bad],
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"),
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2 and "not divisible by the 4 devices" in proc.stderr
