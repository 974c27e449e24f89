"""Tests for zojax.array_leaves: a whole Equinox model is refused, naming the leaf and the fix."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from zojax.array_leaves import check_array_leaves, is_array_leaf

FIX = r"\.activation.*eqx\.partition\(model, eqx\.is_inexact_array\)"


def _model():
  return eqx.nn.MLP(3, 1, 4, 1, key=jax.random.key(0))


TRANSFORMS = {
  "mezo": lambda: zojax.mezo(1e-2),
  "zo_grad+adam": lambda: optax.chain(zojax.zo_grad(), optax.adam(1e-3)),
  "zo_muon": lambda: zojax.zo_muon(1e-2, rank=2),
  "zo_mopi": lambda: zojax.zo_mopi(1e-2, rank=2, k=1),
  "lozo": lambda: zojax.lozo(1e-2),
  "subzero": lambda: zojax.subzero(1e-2, rank=2),
  "mezo_bcd": lambda: zojax.mezo_bcd(1e-2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_init_on_a_whole_module_names_the_leaf_and_the_fix(name):
  with pytest.raises(TypeError, match=FIX):
    TRANSFORMS[name]().init(_model())


def test_update_on_a_whole_module_names_the_leaf_and_the_fix():
  model = _model()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tx = zojax.zo_grad()
  state = tx.init(params)
  loss = lambda m: jnp.sum(m(jnp.ones(3)) ** 2)
  with pytest.raises(TypeError, match=FIX):
    tx.update(None, state, model, value_fn=loss)
  # The fix works: arrays in, model rebuilt inside the loss.
  updates, _ = tx.update(None, state, params, value_fn=lambda p: loss(eqx.combine(p, static)))
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_what_counts_as_an_array():
  for leaf in (jnp.ones(2), np.ones(2), 1.0, 3, np.float32(2), jax.ShapeDtypeStruct((2,), "f4")):
    assert is_array_leaf(leaf)
  for leaf in (jax.nn.relu, lambda x: x, object(), "w"):
    assert not is_array_leaf(leaf)
  check_array_leaves({"a": [jnp.ones(2), None, 1.0], "b": np.zeros(3)})
  with pytest.raises(TypeError, match=r"\['a'\]\[1\] is a str"):
    check_array_leaves({"a": [jnp.ones(2), "oops"]})
  with pytest.raises(TypeError, match="the root is a function"):
    check_array_leaves(lambda x: x)


def test_checked_under_eval_shape():
  # Abstract parameters (jax.eval_shape, jit tracing) pass the check.
  params, _ = eqx.partition(_model(), eqx.is_inexact_array)
  state = jax.eval_shape(zojax.zo_muon(1e-2, rank=2).init, params)
  assert jax.tree.leaves(state)
