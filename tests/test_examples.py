"""End-to-end test of examples/digits_mezo.py at a reduced size."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

pytest.importorskip("sklearn")

_EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "digits_mezo.py"

# Small enough to finish in seconds on 2 CPU cores (most of it is compilation).
_ARGS = ["--steps", "400", "--chunk", "200", "--pretrain-steps", "100", "--seed", "0", "--quiet"]

# Summary entries that measure time, and so differ from run to run.
_TIMINGS = ("finetune_seconds", "compile_seconds", "pretrain_seconds")


def _load_example():
  """Imports the example script as a module (it is not part of the package)."""
  name = "digits_mezo_example"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, _EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  # Registered before running: flax dataclasses look their module up by name.
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  path = tmp_path_factory.mktemp("digits") / "summary.json"
  summary = _load_example().main([*_ARGS, "--json", str(path)])
  return summary, path


def test_mezo_finetuning_improves_accuracy(first_run):
  summary, _ = first_run
  # The zero head predicts a single class: chance level.
  assert summary["accuracy_before"] < 0.2
  # The pretraining stage actually learnt its half of the task.
  assert summary["pretrain_accuracy"] > 0.9
  # 400 MeZO steps reach ~0.6 with this seed; ask for a clear margin.
  assert summary["accuracy_after"] > summary["accuracy_before"] + 0.3
  assert summary["forward_passes"] == 400 * 2


def test_json_summary_written(first_run):
  summary, path = first_run
  written = json.loads(path.read_text())
  expected = {
    "accuracy_before",
    "accuracy_after",
    "pretrain_accuracy",
    "forward_passes",
    "finetune_seconds",
  }
  assert expected <= written.keys()
  assert written["accuracy_after"] == summary["accuracy_after"]
  assert written["forward_passes"] == summary["forward_passes"]


def test_same_seed_same_result(first_run):
  first, _ = first_run
  second = _load_example().main(_ARGS)
  strip = lambda s: {k: v for k, v in s.items() if k not in _TIMINGS}
  assert strip(second) == strip(first)
