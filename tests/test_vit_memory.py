"""Tests of the ViT example's memory report (examples/vit_cifar100/memory.py)."""

import math

import jax
import pytest

from examples.vit_cifar100 import memory
from examples.vit_cifar100 import model as model_lib


@pytest.fixture(scope="module")
def micro_report():
  return memory.report(
    "micro", 16, 8, ["mezo", "zo_muon", "fo-adam"], num_classes=10, num_queries=2, rank=2
  )


def test_arguments_are_params_state_and_batch(micro_report):
  param_bytes = 4 * model_lib.num_params(model_lib.param_shapes("micro", 10, 16))
  batch_bytes = 4 * 8 * 16 * 16 * 3 + 4 * 8
  inference = micro_report["inference"]
  assert inference["arguments"] == param_bytes + batch_bytes
  assert inference["aliased"] == 0
  steps = micro_report["steps"]
  # MeZO keeps a key and a few scalars; Adam two parameter-sized moments.
  assert 0 < steps["mezo"]["arguments"] - inference["arguments"] < 256
  adam_state = steps["fo-adam"]["arguments"] - inference["arguments"]
  assert 2 * param_bytes <= adam_state < 2 * param_bytes + 256
  # Donated parameters and state: the updated ones reuse their buffers.
  for name in ("mezo", "fo-adam"):
    assert steps[name]["aliased"] >= param_bytes


def test_peak_formula_and_ratios(micro_report):
  for figures in [micro_report["inference"], *micro_report["steps"].values()]:
    expected = (
      figures["arguments"] + figures["outputs"] - figures["aliased"] + figures["temporaries"]
    )
    assert figures["peak"] == expected
  steps = micro_report["steps"]
  for figures in steps.values():
    assert math.isclose(
      figures["over_inference"], figures["peak"] / micro_report["inference"]["peak"]
    )
  # A ZO step is far lighter than a backprop step with Adam.
  assert steps["mezo"]["peak"] < steps["fo-adam"]["peak"]
  assert steps["zo_muon"]["forwards_per_step"] == 3
  assert micro_report["backend"] == jax.default_backend()


def test_table_and_bad_input(capsys, tmp_path):
  code = memory.main(["--model", "micro", "--optimizer", "mezo", "nope"])
  assert code == 2 and "unknown --optimizer nope" in capsys.readouterr().err
  assert memory.main(["--model", "ViT-Z"]) == 2
  assert "unknown ViT config" in capsys.readouterr().err
  out = tmp_path / "mem.json"
  code = memory.main(
    ["--model", "micro", "--image-size", "16", "--batch-size", "4", "--optimizer", "mezo"]
    + ["--json", str(out)]
  )
  table = capsys.readouterr().out
  assert code == 0 and "inference forward" in table and "mezo" in table
  assert out.stat().st_size > 0
