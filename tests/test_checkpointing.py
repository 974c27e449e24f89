"""Tests for zojax.checkpointing."""

import json
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import zojax
from tests.training import scan_steps
from zojax import checkpointing

# Stop after T steps, mid-interval: bases are redrawn and blocks switch every
# 3 steps, so the resumed half crosses a refresh (step 6) / a block switch.
T = 4
EVERY = 3

PRESETS = {
  "mezo": (zojax.mezo, {"learning_rate": 0.05, "num_queries": 2}),
  "mezo_bcd": (
    zojax.mezo_bcd,
    {  # three blocks: steps 3-5 and 6-8 lie in one 9-step epoch, on different blocks
      "learning_rate": 0.05,
      "blocks": {"hidden": {"kernel": 0, "bias": 1}, "out": {"kernel": 2, "bias": 2}},
      "switch_every": EVERY,
    },
  ),
  "zo_muon": (
    zojax.zo_muon,
    {"learning_rate": 0.05, "rank": 4, "refresh_every": EVERY, "num_queries": 2},
  ),
  "zo_mopi": (
    zojax.zo_mopi,
    {"learning_rate": 0.02, "rank": 4, "k": 2, "refresh_every": EVERY, "num_queries": 2},
  ),
  "lozo": (zojax.lozo, {"learning_rate": 0.05, "rank": 2, "refresh_every": EVERY}),
  "lozo_m": (zojax.lozo_m, {"learning_rate": 0.05, "rank": 2, "refresh_every": EVERY}),
  "subzero": (zojax.subzero, {"learning_rate": 0.03, "rank": 2, "refresh_every": EVERY}),
}


def _build(name, **overrides):
  make, kwargs = PRESETS[name]
  config = {**kwargs, **overrides}
  return make(**config), {"preset": name, **config}


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 16))
  params = {
    "hidden": {"kernel": jax.random.normal(jax.random.key(0), (6, 8)) * 0.4, "bias": jnp.zeros(8)},
    "out": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)},
  }

  def loss(p):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    logits = h @ p["out"]["kernel"] + p["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return params, loss


def _is_key(x):
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _assert_identical(actual, expected):
  """Same structure (NamedTuple types included), dtypes and bits; keys by key data."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  assert [x.dtype for x in jax.tree.leaves(actual)] == [x.dtype for x in jax.tree.leaves(expected)]
  as_data = lambda tree: jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)
  chex.assert_trees_all_equal(as_data(actual), as_data(expected))


def _save(directory, step, params, opt_state, **kwargs):
  with ocp.CheckpointManager(directory) as manager:
    return checkpointing.save(manager, step, params, opt_state, **kwargs)


def _restore(directory, step, params, opt_state, **kwargs):
  with ocp.CheckpointManager(directory) as manager:
    return checkpointing.restore(manager, step, params, opt_state, **kwargs)


def _schedule_position(state):
  """The part of the state a refresh or block switch changes (None for MeZO)."""
  for name, field in (("SubspaceState", "bases"), ("BlockCoordinateState", "block")):
    found = optax.tree_utils.tree_get(state, name)
    if found is not None:
      return getattr(found, field)
  return None


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_resume_is_bit_identical_to_an_uninterrupted_run(name, tmp_path):
  params, loss = _problem()
  tx, config = _build(name)
  run = scan_steps(tx, loss, T)  # compiled once for all four halves
  # Committed inputs, as restored arrays are, so that the resumed half hits the cache.
  start = jax.device_put((params, tx.init(params)), jax.devices()[0])

  uninterrupted = run(*run(*start))

  halfway = run(*start)
  assert _save(tmp_path, T, *halfway, config=config)
  fresh_tx, fresh_config = _build(name)
  restored = _restore(tmp_path, T, params, fresh_tx.init(params), config=fresh_config)
  _assert_identical(restored, halfway)
  resumed = run(*restored)

  _assert_identical(resumed, uninterrupted)
  assert int(resumed[1][0].count) == 2 * T
  before, after = _schedule_position(halfway[1]), _schedule_position(resumed[1])
  if before is not None:  # a refresh / block switch happened after the resume
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after))
    assert any(not np.array_equal(a, b) for a, b in pairs)


# ----------------------------------------------------------------------------- typed keys


def test_typed_keys_and_namedtuples_round_trip_into_abstract_templates(tmp_path):
  params, _ = _problem()
  tx = zojax.zo_muon(rank=2, num_queries=2, seed=jax.random.key(3, impl="rbg"))
  state = tx.init(params)
  _save(tmp_path, 0, params, state)

  template = jax.eval_shape(tx.init, params)  # jax.ShapeDtypeStructs, typed keys included
  restored_params, restored = _restore(tmp_path, 0, jax.eval_shape(lambda: params), template)

  _assert_identical((restored_params, restored), (params, state))
  assert isinstance(restored[0], zojax.SubspaceState)
  assert isinstance(restored[0].inner_state[0], zojax.ZOGradState)
  for key in (restored[0].key, restored[0].inner_state[0].key):
    assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl="rbg"))


def test_keys_of_another_implementation_are_refused(tmp_path):
  params, _ = _problem()
  rbg = zojax.mezo(0.1, seed=jax.random.key(0, impl="rbg"))
  _save(tmp_path, 0, params, rbg.init(params))
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"\[0\]\.key: saved dtype"):
    _restore(tmp_path, 0, params, zojax.mezo(0.1).init(params))


def test_none_step_restores_the_latest(tmp_path):
  params, _ = _problem()
  tx = zojax.mezo(0.1)
  state = tx.init(params)
  _save(tmp_path, 1, params, state)
  _save(tmp_path, 3, jax.tree.map(lambda x: x + 1, params), state)
  restored_params, _ = _restore(tmp_path, None, params, state)
  chex.assert_trees_all_equal(restored_params, jax.tree.map(lambda x: x + 1, params))


# ----------------------------------------------------------------------------- mismatches


def _mismatch(tmp_path, saved, template, **kwargs):
  params, _ = _problem()
  _save(tmp_path, T, params, saved.init(params), **kwargs.pop("save", {}))
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    _restore(tmp_path, T, params, template.init(params), **kwargs)
  assert isinstance(info.value, ValueError)
  assert "different optimizer configuration" in str(info.value)
  return str(info.value)


def test_another_preset_is_refused(tmp_path):
  message = _mismatch(tmp_path, _build("mezo")[0], _build("zo_muon")[0])
  assert message.startswith("opt_state differs from the checkpoint at step 4")
  assert (
    "at [0].count: saved inside tuple > ZOGradState, expected inside tuple > SubspaceState"
    in (message)
  )
  assert "... and" in message  # only the first few differences are listed


def test_another_rank_is_refused(tmp_path):
  message = _mismatch(tmp_path, _build("zo_muon", rank=2)[0], _build("zo_muon", rank=4)[0])
  assert "at [0].bases[1]: saved shape (8, 2), expected (8, 4)" in message


def test_another_number_of_queries_is_refused(tmp_path):
  message = _mismatch(tmp_path, _build("zo_muon")[0], _build("zo_muon", num_queries=4)[0])
  assert "at [0].inner_state[0].projected_grads: saved shape (2,), expected (4,)" in message


def test_another_config_is_refused(tmp_path):
  tx, config = _build("mezo")
  other = {**config, "learning_rate": 0.1, "eps": 1e-2}
  message = _mismatch(tmp_path, tx, tx, save={"config": config}, config=other)
  assert message.startswith("config differs")
  assert "at ['learning_rate']: saved 0.05, expected 0.1" in message
  assert "at ['eps']: not in the checkpoint (expected 0.01)" in message


def test_config_none_skips_the_check_and_metadata_reads_it(tmp_path):
  params, _ = _problem()
  tx, config = _build("lozo")
  _save(tmp_path, 2, params, tx.init(params), config={**config, "schedule": ("cos", 10)})
  _restore(tmp_path, 2, params, tx.init(params))
  with ocp.CheckpointManager(tmp_path) as manager:
    meta = checkpointing.metadata(manager)
  assert meta["step"] == 2
  assert meta["config"] == {**config, "schedule": ["cos", 10]}  # as JSON reads it back
  assert meta["opt_state"] == checkpointing.signature(tx.init(params))


def test_other_params_are_refused(tmp_path):
  params, _ = _problem()
  tx = zojax.mezo(0.1)
  _save(tmp_path, 0, params, tx.init(params))
  wider = {**params, "out": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
  with pytest.raises(checkpointing.CheckpointMismatchError, match="different parameters") as info:
    _restore(tmp_path, 0, wider, tx.init(params))
  assert "at ['out']['bias']: saved shape (3,), expected (4,)" in str(info.value)


def test_missing_steps_are_reported(tmp_path):
  params, _ = _problem()
  state = zojax.mezo(0.1).init(params)
  with pytest.raises(FileNotFoundError, match="No checkpoints in"):
    _restore(tmp_path, None, params, state)
  _save(tmp_path, 4, params, state)
  with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 7 .*saved steps: \[4\]"):
    _restore(tmp_path, 7, params, state)


def test_checkpoints_not_written_by_save_are_refused(tmp_path):
  params, _ = _problem()
  state = zojax.mezo(0.1).init(params)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.save(1, args=ocp.args.Composite(zojax=ocp.args.JsonSave({"format": "other"})))
  for step in (0, 1):
    with pytest.raises(ValueError, match="not written by zojax.checkpointing.save"):
      _restore(tmp_path, step, params, state)


@pytest.mark.parametrize(
  ("config", "error"), [({"lr": np.float32(0.1)}, TypeError), ({"lr": float("nan")}, ValueError)]
)
def test_config_must_be_json(config, error, tmp_path):
  params, _ = _problem()
  with pytest.raises(error, match="JSON-serializable"):
    _save(tmp_path, 0, params, zojax.mezo(0.1).init(params), config=config)
  with pytest.raises(TypeError, match="dict"):
    _save(tmp_path, 0, params, zojax.mezo(0.1).init(params), config=[0.1])


# ----------------------------------------------------------------------------- signature


def test_signature_tells_configurations_apart():
  params, _ = _problem()
  sig = lambda name, **kw: checkpointing.signature(_build(name, **kw)[0].init(params))
  assert sig("zo_muon") == sig("zo_muon", learning_rate=1.0)  # hyperparameters: the config's job
  distinct = [sig("mezo"), sig("zo_muon"), sig("zo_muon", rank=2), sig("zo_muon", num_queries=4)]
  assert all(a != b for i, a in enumerate(distinct) for b in distinct[i + 1 :])
  json.dumps(distinct)


def test_signature_entries():
  tree = {"a": (jnp.zeros((2, 3), jnp.bfloat16), None), "b": optax.EmptyState()}
  assert checkpointing.signature(tree) == [
    {"path": "['a'][0]", "types": ["dict", "tuple"], "shape": [2, 3], "dtype": "bfloat16"},
    {"path": "['a'][1]", "types": ["dict", "tuple"], "empty": "NoneType"},
    {"path": "['b']", "types": ["dict"], "empty": "EmptyState"},
  ]
  abstract = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  assert checkpointing.signature(abstract) == [
    {"path": "", "types": [], "shape": [], "dtype": "key<fry>"}
  ]


def test_import_zojax_does_not_import_orbax():
  code = "import sys, zojax; sys.exit(any(m.startswith('orbax') for m in sys.modules))"
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_extras_are_saved_and_not_checked(tmp_path):
  params, _ = _problem()
  tx, config = _build("mezo")
  extras = {"data": {"epoch": 3, "index": 17}, "wall_time": 12.5}
  with ocp.CheckpointManager(tmp_path) as manager:
    checkpointing.save(manager, 5, params, tx.init(params), config=config, extras=extras)
  with ocp.CheckpointManager(tmp_path) as manager:
    assert checkpointing.metadata(manager, 5)["extras"] == extras
    checkpointing.restore(manager, 5, params, tx.init(params), config=config)
