"""Tests of benchmarks/lm_query_efficiency.py: pairing, validation-based lr choice, the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import lm_query_efficiency as lmqe


def _fake_grid(scores: dict[float, tuple[float, float]]):
  """A ``run`` for `tune`: per lr, (validation, test) accuracy of 2 seeds, from ``scores``."""
  calls = []

  def run(lrs):
    calls.append(list(lrs))
    val = np.asarray([[scores[lr][0]] * 2 for lr in lrs])
    test = np.asarray([[[0.5, scores[lr][1]]] * 2 for lr in lrs])  # (lrs, seeds, evals)
    return {
      "forwards": np.asarray([0, 10]),
      "test": test,
      "validation": val,
      "final_loss": np.zeros((len(lrs), 2)),
      "batches_sha": np.full((len(lrs), 2), "x"),
      "compile_seconds": 0.0,
      "run_seconds": 0.0,
    }

  return run, calls


def test_tune_picks_the_validation_best_not_the_test_best():
  lr = lmqe.Method("mezo").default_lr
  grid = [float(f"{lr * f:.4g}") for f in (0.5, 1.0, 2.0)]
  # Validation prefers the centre, test the largest learning rate.
  scores = {grid[0]: (0.60, 0.60), grid[1]: (0.80, 0.70), grid[2]: (0.70, 0.90)}
  run, calls = _fake_grid(scores)
  result = lmqe.tune(lmqe.Method("mezo"), run, (0.5, 1.0, 2.0), 3, 2.0, log=lambda _: None)
  assert result["lrs"][result["selected"]] == grid[1]
  assert not result["at_edge"] and result["added_lrs"] == []
  assert calls == [grid]


def test_tune_extends_the_grid_past_an_edge_and_runs_only_the_new_point():
  lr = lmqe.Method("lozo").default_lr
  grid = [float(f"{lr * f:.4g}") for f in (0.5, 1.0, 2.0)]
  beyond = float(f"{grid[2] * 2:.4g}")
  # Validation best at the top edge; the point beyond it is worse (but best on test).
  scores = {grid[0]: (0.6, 0.6), grid[1]: (0.7, 0.7), grid[2]: (0.8, 0.7), beyond: (0.75, 0.95)}
  run, calls = _fake_grid(scores)
  result = lmqe.tune(lmqe.Method("lozo"), run, (0.5, 1.0, 2.0), 3, 2.0, log=lambda _: None)
  assert calls == [grid, [beyond]]
  assert result["lrs"] == [*grid, beyond]
  assert result["added_lrs"] == [beyond]
  assert result["lrs"][result["selected"]] == grid[2]
  assert not result["at_edge"]
  # The merged arrays follow the sorted grid.
  np.testing.assert_allclose(result["validation"][:, 0], [0.6, 0.7, 0.8, 0.75])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """The whole benchmark on a tiny configuration: 2 methods, 2 seeds, a few steps."""
  out = tmp_path_factory.mktemp("lmqe")
  argv = ["--methods", "mezo", "lozo", "--seeds", "2", "--lr-factors", "1", "2"]
  argv += ["--max-extensions", "0", "--forward-budget", "40", "--eval-every", "20"]
  argv += ["--num-train", "48", "--num-dev", "24", "--num-test", "32", "--pretrain-steps", "5"]
  argv += ["--timing-repeats", "1", "--out-dir", str(out), "--resume-dir", str(out / "parts")]
  with pytest.MonkeyPatch.context() as patch:  # a small pretraining corpus: 5 steps use 160 docs
    patch.setattr(lmqe.pretrain_lib, "CORPUS_DOCS", 200)
    result = lmqe.main(argv)
  with open(out / "lm_query_efficiency.json") as f:
    written = json.load(f)
  return result, written, out, argv


def test_a_resumed_run_reads_every_method_back_and_trains_nothing(tiny_run, monkeypatch):
  result, _, out, argv = tiny_run
  assert sorted(p.name for p in (out / "parts").iterdir()) == ["lozo.json", "mezo.json"]

  def no_training(*args, **kwargs):
    raise AssertionError("a resumed run trained a method again")

  monkeypatch.setattr(lmqe, "run_grid", no_training)
  monkeypatch.setattr(lmqe.pretrain_lib, "CORPUS_DOCS", 200)
  again = lmqe.main([*argv[: argv.index("--out-dir")], "--resume-dir", str(out / "parts")])
  for a, b in zip(result["rows"], again["rows"]):
    assert (
      a["method"] == b["method"]
      and a["curves"] == b["curves"]
      and a["selected_lr"] == b["selected_lr"]
    )
    assert a["auc"]["by_seed"] == b["auc"]["by_seed"]
  assert again["target"] == result["target"]


def test_json_holds_every_per_seed_curve(tiny_run):
  _, written, out, _ = tiny_run
  assert (out / "lm_query_efficiency.png").stat().st_size > 0
  rows = {r["method"]: r for r in written["rows"]}
  assert set(rows) == {"mezo", "lozo"}
  for row in rows.values():
    assert len(row["lrs"]) == 2
    assert set(row["curves"]) == {f"{lr:g}" for lr in row["lrs"]}
    for per_seed in row["curves"].values():
      assert set(per_seed) == {"0", "1"}
      for curve in per_seed.values():
        assert len(curve) == len(row["forwards"]) == 3  # 0, 20 and 40 forwards
    assert len(row["auc"]["by_seed"]) == 2
    assert row["auc"]["low"] <= row["auc"]["point"] <= row["auc"]["high"]
  assert rows["mezo"]["auc"]["minus_mezo"]["point"] == 0.0


def test_paired_runs_share_the_initial_model_and_batches(tiny_run):
  _, written, _, _ = tiny_run
  rows = written["rows"]
  for seed in ("0", "1"):
    # Same initial model: every method and lr has the same test accuracy before any step.
    starts = {c[seed][0] for r in rows for c in r["curves"].values()}
    assert len(starts) == 1
    # Same batches: every run of the seed trained on the same batch indices.
    column = int(seed)
    shas = {sha[column] for r in rows for sha in r["batches_sha_by_lr"]}
    assert len(shas) == 1
  assert rows[0]["batches_sha_by_lr"][0][0] != rows[0]["batches_sha_by_lr"][0][1]


def test_validation_examples_come_from_the_training_pool_only():
  task = lmqe.Task(
    config=None,
    label_ids=np.asarray([0, 1]),
    params={},
    pools={
      "train": (np.arange(200)[:, None] * np.ones((1, 4), np.int32), np.zeros(200, np.int32)),
      "validation": (-np.arange(1, 101)[:, None] * np.ones((1, 4), np.int32), np.ones(100)),
    },
    description={},
  )
  data = lmqe.prepare_seed(task, 3, steps=5, batch_size=4, num_train=50, num_dev=20, num_test=30)
  train_rows, dev_rows = set(data.train_x[:, 0]), set(data.dev_x[:, 0])
  assert min(train_rows | dev_rows) >= 0  # both drawn from the training pool
  assert not train_rows & dev_rows
  assert max(data.test_x[:, 0]) < 0  # test from the validation pool
  assert data.order.shape == (5, 4) and data.order.max() < 50


def test_zo_mopi_is_built_with_half_rank_k_and_random_refresh(monkeypatch):
  seen = {}
  real = lmqe.zojax.zo_mopi

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(lmqe.zojax, "zo_mopi", spy)
  method = lmqe.Method("zo_mopi")
  opt = method.make(1.0, seed=3)
  assert seen["k"] == method.rank // 2 and seen["anchored"] is False
  assert seen["refresh_every"] == lmqe.ZO_MOPI_REFRESH_EVERY and seen["key"] == 3
  assert seen["vector_learning_rate"] == pytest.approx(1.0 / 100)  # the example's lr / 100
  assert opt.forwards_per_step == 9 and opt.zeroth_order


def test_mezo_reaches_its_own_final_accuracy_with_float32_curves():
  # The full run's MeZO finals: float32 accuracies whose float32 mean (0.7494001) sits above
  # their float64 mean (0.74940004); MeZO must still reach its own target at its last evaluation.
  finals = np.asarray([0.756, 0.738, 0.737, 0.74, 0.756, 0.745, 0.754, 0.759, 0.755, 0.754])
  rng = np.random.default_rng(0)
  curves = np.concatenate([0.7 + 0.01 * rng.random((10, 8)), finals[:, None]], axis=1)
  curves = curves.astype(np.float32)
  assert float(curves[:, -1].mean()) > float(np.mean(curves[:, -1], dtype=np.float64))
  run = {
    "forwards": np.arange(9) * 450,
    "test": curves[None],
    "validation": np.full((1, 10), 0.7),
    "final_loss": np.zeros((1, 10)),
    "batches_sha": np.full((1, 10), "x"),
    "forwards_per_step": 2,
    "steps": 1800,
    "lrs": [1e-4],
    "initial_lrs": [1e-4],
    "added_lrs": [],
    "selected": 0,
    "at_edge": False,
    "compile_seconds": 0.0,
    "run_seconds": 0.0,
    "batching": "vmap",
  }
  rows = lmqe.summarize([lmqe.Method("mezo")], {"mezo": run}, {"mezo": 1e-3}, range(10), [3600])
  assert rows[0]["to_target"]["point"] == 3600
  assert rows[0]["to_target"]["ratio_to_mezo"] == 1.0
