"""Tests for zojax.checkpointing."""

import json
import shutil
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
  tx = zojax.zo_muon(rank=2, num_queries=2, key=jax.random.key(3, impl="rbg"))
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
  rbg = zojax.mezo(0.1, key=jax.random.key(0, impl="rbg"))
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


# ----------------------------------------------------------------------------- damage


def _random_problem():
  """Parameters whose data files are large enough to damage mid-file (random, incompressible)."""
  params = {"w": jax.random.normal(jax.random.key(1), (64, 32)), "b": jnp.arange(32.0)}
  return params, zojax.mezo(0.1, num_queries=2)


def _data_files(directory, step, item="params"):
  """The array data files of one item of a step, largest first."""
  files = [
    p for p in (directory / str(step) / item).rglob("*") if p.is_file() and p.parent.name == "d"
  ]
  assert files, f"no data files under {directory / str(step) / item}"
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _flip_bytes(path, count=16):
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  for i in range(middle, middle + count):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _metadata_file(directory, step):
  return directory / str(step) / "zojax" / "metadata"


def _corrupted(directory, step, params, state, match):
  with pytest.raises(checkpointing.CheckpointCorruptedError, match=match) as info:
    _restore(directory, step, params, state)
  message = str(info.value)
  assert f"Checkpoint step {step} in {directory}" in message, message
  assert info.value.step == step and info.value.directory == str(directory)
  assert isinstance(info.value, ValueError)
  return message


def test_flipped_bytes_in_an_array_file_are_detected(tmp_path):
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params))
  _flip_bytes(_data_files(tmp_path, 4)[0])
  # Without the digest, orbax returns values near 3e38 here and no error.
  _corrupted(tmp_path, 4, params, tx.init(params), "arrays differ from the SHA-256 digest")


@pytest.mark.parametrize("damage", [_truncate, lambda path: path.unlink()])
def test_truncated_or_missing_array_files_are_reported(damage, tmp_path):
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params))
  for path in _data_files(tmp_path, 4):
    damage(path)
  _corrupted(tmp_path, 4, params, tx.init(params), "its arrays cannot be read")


@pytest.mark.parametrize("item", ["params", "opt_state"])
def test_arrays_of_another_checkpoint_are_detected(item, tmp_path):
  """Same structure, other values: parameters, or a state differing only in its typed key."""
  params, _ = _random_problem()
  other = jax.tree.map(lambda x: x + 1, params) if item == "params" else params
  _save(tmp_path / "a", 4, params, zojax.mezo(0.1, key=0).init(params))
  _save(tmp_path / "b", 4, other, zojax.mezo(0.1, key=1).init(params))
  shutil.rmtree(tmp_path / "a" / "4" / item)
  shutil.copytree(tmp_path / "b" / "4" / item, tmp_path / "a" / "4" / item)
  state = zojax.mezo(0.1, key=0).init(params)
  _corrupted(tmp_path / "a", 4, params, state, "arrays differ from the SHA-256 digest")


def test_garbage_metadata_names_the_file(tmp_path):
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params))
  _metadata_file(tmp_path, 4).write_text("{not json")
  message = _corrupted(tmp_path, 4, params, tx.init(params), "cannot be read")
  assert str(_metadata_file(tmp_path, 4)) in message
  assert "Expecting property name" in message
  with ocp.CheckpointManager(tmp_path) as manager:
    with pytest.raises(checkpointing.CheckpointCorruptedError, match="metadata file"):
      checkpointing.metadata(manager, 4)


@pytest.mark.parametrize(
  "edit",
  [
    lambda meta: meta["extras"].update(position=18),  # valid JSON, other content
    lambda meta: meta["params"][0].update(shape=[64, 33]),  # damage, not a mismatch
    lambda meta: meta.pop("arrays_sha256"),
  ],
)
def test_edited_metadata_is_detected(edit, tmp_path):
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params), extras={"position": 17})
  meta = json.loads(_metadata_file(tmp_path, 4).read_text())
  edit(meta)
  _metadata_file(tmp_path, 4).write_text(json.dumps(meta))
  message = _corrupted(tmp_path, 4, params, tx.init(params), "metadata file")
  assert str(_metadata_file(tmp_path, 4)) in message


def test_checkpoints_without_digests_still_restore(tmp_path):
  """Format 1 (written before the digests) is read, unverified."""
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params), extras={"position": 17})
  meta = json.loads(_metadata_file(tmp_path, 4).read_text())
  meta = {k: v for k, v in meta.items() if not k.endswith("sha256")}
  _metadata_file(tmp_path, 4).write_text(json.dumps({**meta, "format": "zojax.checkpointing/1"}))
  restored, _ = _restore(tmp_path, 4, params, tx.init(params))
  chex.assert_trees_all_equal(restored, params)


def test_an_empty_step_directory_is_incomplete(tmp_path):
  params, tx = _random_problem()
  _save(tmp_path, 4, params, tx.init(params))
  (tmp_path / "6").mkdir()
  _corrupted(tmp_path, 6, params, tx.init(params), "holds no items")


# ----------------------------------------------------------------------------- latest intact


def _three_steps(directory):
  """Steps 1, 2, 3 with parameters params + step."""
  params, tx = _random_problem()
  state = tx.init(params)
  with ocp.CheckpointManager(directory) as manager:
    for step in (1, 2, 3):
      checkpointing.save(manager, step, jax.tree.map(lambda x: x + step, params), state)
  return params, state


def test_restore_latest_intact_skips_damaged_steps(tmp_path):
  params, state = _three_steps(tmp_path)
  _flip_bytes(_data_files(tmp_path, 3)[0])
  _metadata_file(tmp_path, 2).write_text("garbage")
  with ocp.CheckpointManager(tmp_path) as manager:
    found = checkpointing.restore_latest_intact(manager, params, state)
  assert found.metadata["step"] == 1
  chex.assert_trees_all_equal(found.params, jax.tree.map(lambda x: x + 1, params))
  _assert_identical(found.opt_state, state)
  assert [step for step, _ in found.skipped] == [3, 2]
  assert "Checkpoint step 3" in found.skipped[0][1] and "SHA-256" in found.skipped[0][1]
  assert str(_metadata_file(tmp_path, 2)) in found.skipped[1][1]
  assert (tmp_path / "3").is_dir() and (tmp_path / "2").is_dir()  # nothing is removed


def test_restore_latest_intact_takes_the_latest_when_intact(tmp_path):
  params, state = _three_steps(tmp_path)
  found = checkpointing.restore_latest_intact(tmp_path, params, state)
  assert found.metadata["step"] == 3 and found.skipped == ()
  chex.assert_trees_all_equal(found.params, jax.tree.map(lambda x: x + 3, params))


def test_restore_latest_intact_fails_when_no_step_is_intact(tmp_path):
  params, state = _three_steps(tmp_path)
  for step in (1, 2, 3):
    _truncate(_data_files(tmp_path, step)[0])
  with pytest.raises(checkpointing.CheckpointCorruptedError, match="No intact checkpoint") as info:
    checkpointing.restore_latest_intact(tmp_path, params, state)
  for step in (1, 2, 3):
    assert f"Checkpoint step {step} in" in str(info.value)


def test_restore_latest_intact_stops_at_another_configuration(tmp_path):
  params, state = _three_steps(tmp_path)
  _metadata_file(tmp_path, 3).write_text("garbage")
  with pytest.raises(checkpointing.CheckpointMismatchError, match="at step 2"):
    checkpointing.restore_latest_intact(tmp_path, params, zojax.zo_muon(0.1).init(params))


def test_a_missing_directory_is_reported_and_not_created(tmp_path):
  params, state = _three_steps(tmp_path / "ckpt")
  missing = tmp_path / "typo"
  with pytest.raises(FileNotFoundError, match=f"directory {missing} does not exist"):
    checkpointing.restore_latest_intact(missing, params, state)
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(missing, options=options) as manager:
    with pytest.raises(FileNotFoundError, match=f"directory {missing} does not exist"):
      checkpointing.restore(manager, None, params, state)
  assert not missing.exists()
