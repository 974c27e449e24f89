"""Tests for the pure pieces of benchmarks/query_efficiency.py (no training)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks import query_efficiency as qe


def test_validation_split_holds_out_a_share_of_every_class():
  labels = np.repeat(np.arange(10), [40, 35, 30, 41, 50, 20, 33, 37, 44, 39])
  train, val = qe.validation_split(labels, 0.2, seed=3)
  assert np.intersect1d(train, val).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
  for c in range(10):
    assert np.sum(labels[val] == c) == round(0.2 * np.sum(labels == c))
  again = qe.validation_split(labels, 0.2, seed=3)
  np.testing.assert_array_equal(val, again[1])
  assert not np.array_equal(val, qe.validation_split(labels, 0.2, seed=4)[1])


def test_zo_mopi_runs_the_released_recipe():
  mopi = qe.with_mopi_refresh(qe.Method("zo_mopi", "zo_mopi"), 100)
  assert mopi.knobs == {"rank": 8, "k": 4, "anchored": False, "refresh_every": 100}
  variant = qe.with_mopi_refresh(qe.parse_variant("zo_mopi:rank=16,refresh_every=7"), 100)
  assert variant.knobs["k"] == 8 and variant.knobs["refresh_every"] == 7
  assert qe.with_mopi_refresh(qe.Method("mezo", "mezo"), 100).overrides == ()


def test_merge_runs_puts_the_new_learning_rate_at_the_right_end():
  runs = {k: np.zeros((2, 3, 4)) for k in ("test", "validation")}
  runs |= {"final_loss": np.zeros((2, 3)), "compile_seconds": 1.0, "run_seconds": 2.0}
  new = {k: np.ones((1, 3, 4)) for k in ("test", "validation")}
  new |= {"final_loss": np.ones((1, 3)), "compile_seconds": 0.0, "run_seconds": 1.0}
  front = qe.merge_runs(runs, new, front=True)
  assert front["test"].shape == (3, 3, 4) and front["test"][0].all() and not front["test"][1:].any()
  back = qe.merge_runs(runs, new, front=False)
  assert back["validation"][-1].all() and back["final_loss"][-1].all()
  assert back["run_seconds"] == 3.0


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--seeds", "0"], "at least 2"),
    (["--seeds", "1", "1"], "distinct"),
    (["--methods", "zo_muon"], "mezo"),
  ],
)
def test_parse_args_rejects(argv, match, capsys):
  with pytest.raises(SystemExit):
    qe.parse_args(argv)
  assert match in capsys.readouterr().err


def test_default_is_ten_seeds_and_quick_fewer():
  assert qe.parse_args([]).seeds == list(range(10))
  assert 2 <= len(qe.parse_args(["--quick"]).seeds) < 10


def _fake_runs(peak: float):
  """A `run_method` stand-in: final validation accuracy peaks at learning rate ``peak``."""

  def run(method, apply, seeds, lrs, budget, eval_every, log, batching, cache):
    score = np.array([1.0 - abs(np.log2(lr / peak)) / 10 for lr in lrs])
    curves = np.broadcast_to(score[:, None, None], (len(lrs), 2, 3)).copy()
    return {
      "forwards": np.arange(3),
      "test": curves,
      "validation": curves,
      "final_loss": np.zeros((len(lrs), 2)),
      "compile_seconds": 0.0,
      "run_seconds": 0.0,
    }

  return run


@pytest.mark.parametrize(
  "peak,max_extensions,grid,edge",
  [
    (1.25e-4, 3, [6.25e-5, 1.25e-4, 2.5e-4], False),  # interior at once
    (1e-3, 3, [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3], False),  # three steps up
    (1e-2, 3, [6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3], True),  # bounded: still at the edge
    (1e-5, 1, [3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4], True),
  ],
)
def test_tune_method_extends_the_grid_while_the_choice_is_at_an_edge(
  monkeypatch, peak, max_extensions, grid, edge
):
  monkeypatch.setattr(qe, "run_method", _fake_runs(peak))
  args = qe.parse_args(["--max-extensions", str(max_extensions)])
  runs, lrs, history = qe.tune_method(qe.Method("mezo", "mezo"), None, [], 100, args, "vmap", print)
  assert lrs == pytest.approx(grid)
  assert history[-1]["at_edge"] is edge
  assert len(history) - 1 <= max_extensions
  assert runs["validation"].shape[0] == len(lrs)


def _fake_main_pieces(monkeypatch, calls):
  """``main`` without pretraining, timing or training: `tune_method` returns `_fake_runs`'s grid."""
  import types

  def seed_data(seed, args, steps, log):
    z = np.zeros(4)
    return types.SimpleNamespace(
      seed=seed, params={"w": z}, train_y=z, val_y=z, test_y=z, pretrain_accuracy=0.5
    )

  def tune(method, apply, seeds, budget, args, batching, log):
    calls.append(method.label)
    scale = {"mezo": 1e-3}.get(method.name, 1e-2)
    runs = _fake_runs(scale)(method, None, seeds, [scale / 2, scale, scale * 2], 0, 0, 0, 0, 0)
    runs.update(forwards_per_step=2, steps=3, forwards=np.arange(3) * 2)
    history = [{"lrs": [scale / 2, scale, scale * 2], "chosen_lr": scale, "at_edge": False}]
    return runs, [scale / 2, scale, scale * 2], history

  monkeypatch.setattr(qe, "prepare_seed", seed_data)
  monkeypatch.setattr(qe, "step_times", lambda methods, *a: {m.label: 0.01 for m in methods})
  monkeypatch.setattr(qe, "tune_method", tune)


def test_resume_dir_reuses_finished_methods_only_under_the_same_settings(monkeypatch, tmp_path):
  calls = []
  _fake_main_pieces(monkeypatch, calls)
  argv = ["--quick", "--seeds", "0", "1", "--methods", "mezo", "lozo"]
  argv += ["--resume-dir", str(tmp_path)]
  first = qe.main(argv)
  assert calls == ["mezo", "lozo"]
  assert sorted(os.listdir(tmp_path)) == ["lozo.json", "mezo.json"]
  second = qe.main(argv)
  assert calls == ["mezo", "lozo"]  # nothing trained again
  for a, b in zip(first["rows"], second["rows"]):
    assert a["test_curves"] == b["test_curves"] and a["chosen_lr"] == b["chosen_lr"]
  assert second["mezo_final_mean"] == first["mezo_final_mean"]
  argv += ["--forward-budget", "500"]
  qe.main(argv)  # another setting: both run again (and their parts are replaced)
  assert calls == ["mezo", "lozo", "mezo", "lozo"]
  qe.main([*argv, "--methods", "mezo", "lozo", "subzero"])  # only the new method runs
  assert calls[4:] == ["subzero"]
