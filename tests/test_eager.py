"""Eager ``update`` calls: one compiled step per loss program, equal to the jitted step."""

import contextlib
import warnings

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import zojax
from zojax import eager

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
  """Counts XLA compilations (jax.monitoring's backend-compile events) inside the block."""
  counter = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == _COMPILE_EVENT:
      counter[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _params():
  # Not weak-typed: a weak-typed leaf comes back strong from the first step, and jax.jit
  # (eager or not) compiles once more for the new input types.
  p = {f"w{i}": jnp.full((64, 64), 0.01 + 0.001 * i, jnp.float32) for i in range(3)}
  p["b"] = jnp.zeros(64, jnp.float32)
  return p


def _loss(p, x):
  h = x
  for i in range(3):
    h = jnp.tanh(h @ p[f"w{i}"] + p["b"])
  return jnp.mean(h**2)


def _batch(step):
  return jax.random.normal(jax.random.key(100 + step), (8, 64))


PRESETS = {
  "mezo": lambda: zojax.mezo(1e-2, weight_decay=1e-3),
  "zo_muon": lambda: zojax.zo_muon(1e-2, rank=8, refresh_every=2),
  "zo_mopi": lambda: zojax.zo_mopi(1e-2, rank=8, k=4, refresh_every=2),
  "lozo": lambda: zojax.lozo(1e-2, refresh_every=2),
  "lozo_m": lambda: zojax.lozo_m(1e-2, refresh_every=2),
  "subzero": lambda: zojax.subzero(1e-2, rank=8, refresh_every=2),
  "mezo_bcd": lambda: zojax.mezo_bcd(1e-2, switch_every=1),
}


# mezo's chain has optax transforms after zo_grad (weight decay, learning rate), which an eager
# call runs op by op; in a jitted step XLA fuses them and may contract ``u + wd * p`` into a
# fused multiply-add (one rounding instead of two): updates then differ by up to an ulp or
# so of the intermediate terms, far below 2^-21 (4 ulps) of the largest update (the terms
# are of the order of the updates; a result that cancels to near zero keeps that absolute
# error, hence the absolute part of the tolerance).
TAIL_RTOL = {"mezo": 2.0**-21}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_eager_steps_compile_once_and_equal_jitted_steps(name):
  """5 eager steps, each with a new closure over a new batch, crossing two basis refreshes.

  After the first step nothing compiles (the listener sees every XLA compilation of the
  process, so this also covers op-by-op dispatch), and every eager step equals the jitted
  step from the same inputs bit for bit: the compiled step evaluates the same program (up
  to `TAIL_RTOL` for optax transforms an eager call runs op by op after the zojax one).
  """
  tx = PRESETS[name]()

  @jax.jit
  def jitted(state, params, x):
    return tx.update(None, state, params, value_fn=lambda p: _loss(p, x))

  params = _params()
  state = tx.init(params)
  with count_compiles() as compiles:
    for step in range(5):
      x = _batch(step)
      jit_updates, jit_state = _uncounted(jitted, compiles, state, params, x)
      updates, state = tx.update(None, state, params, value_fn=lambda p: _loss(p, x))
      chex.assert_trees_all_equal(state, jit_state)
      if name in TAIL_RTOL:
        scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(jit_updates))
        tol = TAIL_RTOL[name]
        chex.assert_trees_all_close(updates, jit_updates, rtol=tol, atol=tol * scale)
      else:
        chex.assert_trees_all_equal(updates, jit_updates)
      params = jax.block_until_ready(optax.apply_updates(params, updates))
      if step == 0:
        after_first = compiles[0]
  assert compiles[0] == after_first, f"{compiles[0] - after_first} compilations after step 1"


def _uncounted(fn, counter, *args):
  """``fn(*args)``, its compilations not counted."""
  before = counter[0]
  out = jax.block_until_ready(fn(*args))
  counter[0] = before
  return out


class _Trainer:
  """A loss that reads its batch from an attribute: the same bound method every step."""

  def __init__(self):
    self.x = _batch(0)

  def loss(self, p):
    return _loss(p, self.x)


def test_same_function_reading_new_data_is_not_stale():
  """The loss is traced every eager call, so data it reads from anywhere is current."""
  tx = zojax.zo_muon(1e-2, rank=8)
  trainer = _Trainer()
  params = _params()
  state = tx.init(params)

  @jax.jit
  def jitted(state, params, x):
    return tx.update(None, state, params, value_fn=lambda p: _loss(p, x))

  for step in range(3):
    trainer.x = _batch(step)
    want = jitted(state, params, trainer.x)
    updates, state = tx.update(None, state, params, value_fn=trainer.loss)
    chex.assert_trees_all_equal((updates, state), want)
    params = optax.apply_updates(params, updates)


def test_loss_bound_at_construction_takes_batches_without_recompiling():
  tx = zojax.zo_muon(1e-2, rank=8, loss_fn=_loss)
  params = _params()
  state = tx.init(params)
  with count_compiles() as compiles:
    for step in range(4):
      updates, state = tx.update(None, state, params, batch=_batch(step))
      params = jax.block_until_ready(optax.apply_updates(params, updates))
      if step == 0:
        after_first = compiles[0]
  assert compiles[0] == after_first


def test_a_loss_whose_program_changes_compiles_each_time_and_warns_once():
  """A new Python number in the loss every call is a new program: compiled (not reused, which
  would be stale), the cache stays bounded, and the `WARN_AFTER`-th compilation warns."""
  tx = zojax.zo_grad(num_queries=2)
  params = _params()
  state = tx.init(params)
  x = _batch(0)
  steps = eager.MAX_CACHED_STEPS + 2
  with warnings.catch_warnings(record=True) as caught, count_compiles() as compiles:
    warnings.simplefilter("always")
    for step in range(steps):
      scale = 1.0 + step
      want = jax.jit(lambda s, p: tx.update(None, s, p, value_fn=lambda q: scale * _loss(q, x)))(
        state, params
      )
      before = compiles[0]
      got = tx.update(None, state, params, value_fn=lambda q: scale * _loss(q, x))
      assert compiles[0] - before >= 1  # the eager step compiled (after its reference did)
      chex.assert_trees_all_equal(got, want)
      state = got[1]
    # The first program was dropped from the cache (bounded): it compiles again, then is reused.
    scale = 1.0
    for expected in (1, 0):
      before = compiles[0]
      tx.update(None, state, params, value_fn=lambda q: scale * _loss(q, x))
      assert compiles[0] - before == expected
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  hits = [m for m in messages if "outside jax.jit" in m]
  assert len(hits) == 1, messages
  assert "jax.jit" in hits[0] and "def step(params, state, batch)" in hits[0]


def test_traced_calls_are_not_dispatched():
  """Under jax.jit (and jax.disable_jit) update runs as written: no nested compiled step."""
  tx = zojax.zo_grad()
  params = _params()
  state = tx.init(params)
  x = _batch(0)
  with jax.disable_jit():
    tx.update(None, state, params, value_fn=lambda p: _loss(p, x))
  jaxpr = jax.make_jaxpr(lambda s, p: tx.update(None, s, p, value_fn=lambda q: _loss(q, x)))(
    state, params
  )
  names = [e.params.get("name") for e in jaxpr.jaxpr.eqns]
  assert "run" not in names
