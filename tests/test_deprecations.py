"""Renamed arguments: the old spelling warns, builds the same optimizer, and cannot be mixed."""

import jax
import jax.numpy as jnp
import optax
import pytest

import zojax

PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 7.0, "b": jnp.ones(3)}
LOSS = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(jnp.sin(p["b"]))  # noqa: E731

# Every factory that draws random numbers, as (name, build(**key_or_seed)).
KEYED = {
  "zo_grad": lambda **kw: zojax.zo_grad(**kw),
  "mezo": lambda **kw: zojax.mezo(1e-2, **kw),
  "mezo_bcd": lambda **kw: zojax.mezo_bcd(1e-2, switch_every=1, **kw),
  "zo_muon": lambda **kw: zojax.zo_muon(1e-2, rank=1, **kw),
  "zo_mopi": lambda **kw: zojax.zo_mopi(1e-2, rank=2, k=1, **kw),
  "lozo": lambda **kw: zojax.lozo(1e-2, rank=1, **kw),
  "lozo_m": lambda **kw: zojax.lozo_m(1e-2, rank=1, **kw),
  "subzero": lambda **kw: zojax.subzero(1e-2, rank=1, **kw),
  "subspace": lambda **kw: zojax.subspace(zojax.zo_grad(), rank=1, **kw),
  "block_coordinate": lambda **kw: zojax.block_coordinate(zojax.zo_grad(), **kw),
  "orthogonalize": lambda **kw: zojax.orthogonalize("power_iteration", rank=1, **kw),
  "stochastic_rounding": lambda **kw: zojax.stochastic_rounding(**kw),
}

# Every factory that takes the matrix view of the leaves.
DIMS = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=0)
VIEWED = {
  "zo_muon": lambda **kw: zojax.zo_muon(1e-2, rank=1, **kw),
  "zo_mopi": lambda **kw: zojax.zo_mopi(1e-2, rank=2, k=1, **kw),
  "lozo": lambda **kw: zojax.lozo(1e-2, rank=1, **kw),
  "lozo_m": lambda **kw: zojax.lozo_m(1e-2, rank=1, **kw),
  "subzero": lambda **kw: zojax.subzero(1e-2, rank=1, **kw),
  "subspace": lambda **kw: zojax.subspace(zojax.zo_grad(), rank=1, **kw),
  "orthogonalize": lambda **kw: zojax.orthogonalize(**kw),
  "split_learning_rates": lambda **kw: zojax.split_learning_rates(0.1, 0.01, **kw),
}


def _step(tx, params=PARAMS):
  """The state after ``init`` and, for an optimizer with an estimator, one jitted step."""
  state = tx.init(params)
  if not zojax.trajectory._records(state):
    return (state,)
  step = jax.jit(lambda s: tx.update(None, s, params, value_fn=LOSS))
  return step(state)


def _key_data(x):
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _assert_same(a, b):
  a, b = jax.tree.map(_key_data, a), jax.tree.map(_key_data, b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert jnp.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("name", sorted(KEYED))
def test_seed_is_a_deprecated_key(name):
  build = KEYED[name]
  with pytest.warns(DeprecationWarning, match=r"seed=.*pass key="):
    old = build(seed=3)
  # stochastic_rounding asks for narrow parameters.
  params = (
    jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    if name == "stochastic_rounding"
    else PARAMS
  )
  _assert_same(_step(old, params), _step(build(key=3), params))
  with pytest.raises(ValueError, match="both key= and"), pytest.warns(DeprecationWarning):
    build(key=4, seed=3)


@pytest.mark.parametrize("name", sorted(VIEWED))
def test_dimension_numbers_is_deprecated(name):
  build = VIEWED[name]
  with pytest.warns(DeprecationWarning, match=r"dimension_numbers=.*weight_dimension_numbers="):
    old = build(dimension_numbers=DIMS)
  if name in ("orthogonalize", "split_learning_rates"):
    updates = PARAMS
    _assert_same(
      old.update(updates, old.init(PARAMS), PARAMS),
      (lambda t: t.update(updates, t.init(PARAMS), PARAMS))(build(weight_dimension_numbers=DIMS)),
    )
  else:
    _assert_same(_step(old), _step(build(weight_dimension_numbers=DIMS)))
  with pytest.raises(ValueError, match="both weight_dimension_numbers="):
    with pytest.warns(DeprecationWarning):
      build(weight_dimension_numbers=DIMS, dimension_numbers=DIMS)
