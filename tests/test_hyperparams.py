"""Tests for zojax.hyperparams and the presets' checks: bad values fail at construction,
optax.inject_hyperparams works with every preset, and a state from another configuration
is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zojax
from tests import numerics
from zojax import hyperparams

PRESETS = ("mezo", "mezo_bcd", "zo_muon", "zo_mopi", "lozo", "lozo_m", "subzero")


def problem():
  params = {"w": jnp.linspace(-0.5, 0.5, 48).reshape(8, 6), "b": jnp.zeros(6)}

  def loss(p):
    return jnp.sum((jnp.ones(8) @ p["w"] + p["b"] - 1.0) ** 2)

  return params, loss


def small(name, **extra):
  """Constructor arguments that keep each preset small (rank 2 on an 8 x 6 matrix)."""
  kw = {
    "mezo": {},
    "mezo_bcd": {"blocks": {"w": 0, "b": 1}, "switch_every": 2},
    "zo_muon": {"rank": 2},
    "zo_mopi": {"rank": 2, "k": 1, "refresh_every": 2},
    "lozo": {"rank": 2, "refresh_every": 2},
    "lozo_m": {"rank": 2, "refresh_every": 2},
    "subzero": {"rank": 2, "refresh_every": 2},
  }[name]
  return {**kw, **extra}


def run(tx, params, loss, steps=4, jit_init=False):
  state = (jax.jit(tx.init) if jit_init else tx.init)(params)
  step = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  return params, state


# ---------------------------------------------------------------------------
# optax.inject_hyperparams


@pytest.mark.parametrize("name", PRESETS)
def test_inject_hyperparams_runs_every_preset_as_the_preset(name):
  # Both transforms step from the same parameters (the plain preset's
  # trajectory, 4 steps: refreshes and block switches included) and their
  # updates are compared. The two programs differ (the learning rate is a
  # constant in one, a runtime array in the other), so XLA may round
  # differently; in float64 (tests/numerics.py) that stays below F64_RTOL.
  # ZO-Muon and ZO-MOPI orthogonalize in float32: their orthogonalizer's
  # inputs may differ by a few float32 ulps, and each of Newton-Schulz's 5
  # iterations multiplies a perturbation by at most its leading coefficient
  # a = 3.4445, so 16 ulps * a^5 of the largest update (5e-4 relative) bounds
  # the difference. A wrong structural value (rank, k, num_queries read back
  # from the state) or learning rate differs at order one.
  preset = getattr(zojax, name)
  with numerics.float64():
    params, loss = problem()
    params = numerics.to_float64(params)
    plain = preset(learning_rate=1e-2, **small(name))
    injected = optax.inject_hyperparams(preset)(learning_rate=1e-2, **small(name))
    s_plain, s_injected = plain.init(params), injected.init(params)
    step_plain = jax.jit(lambda p, s: plain.update(None, s, p, value_fn=loss))
    step_injected = jax.jit(lambda p, s: injected.update(None, s, p, value_fn=loss))
    float32_inside = name in ("zo_muon", "zo_mopi")
    for _ in range(4):
      u_plain, s_plain = step_plain(params, s_plain)
      u_injected, s_injected = step_injected(params, s_injected)
      for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_injected)):
        scale = float(np.max(np.abs(a)))
        ns_bound = 16 * numerics.F32_UNIT_ROUNDOFF * 3.4445**5 * scale
        atol = ns_bound if float32_inside else numerics.F64_ATOL
        np.testing.assert_allclose(a, b, rtol=0 if float32_inside else numerics.F64_RTOL, atol=atol)
      params = optax.apply_updates(params, u_plain)
    assert not np.allclose(params["w"], problem()[0]["w"])  # the trajectory moved
    np.testing.assert_allclose(float(s_injected.hyperparams["learning_rate"]), 1e-2)


@pytest.mark.parametrize("name", PRESETS)
def test_injected_learning_rate_is_changed_in_the_state(name):
  # Setting the learning rate to 0 in the state freezes the parameters: the
  # value in the state, not the one given at construction, drives the step.
  preset = getattr(zojax, name)
  params, loss = problem()
  tx = optax.inject_hyperparams(preset)(learning_rate=1e-2, **small(name))
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.zeros([], jnp.float32)
  if "vector_learning_rate" in state.hyperparams:
    state.hyperparams["vector_learning_rate"] = jnp.zeros([], jnp.float32)
  if "weight_decay" in state.hyperparams:
    state.hyperparams["weight_decay"] = jnp.zeros([], jnp.float32)
  updates, _ = jax.jit(lambda p, s: tx.update(None, s, p, value_fn=loss))(params, state)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, np.zeros_like(u))


def test_inject_eps_and_momentum():
  params, loss = problem()
  tx = optax.inject_hyperparams(zojax.lozo_m)(learning_rate=1e-2, eps=1e-3, beta=0.5, rank=2)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"learning_rate", "eps", "beta", "rank", "refresh_every"}
  out, _ = run(tx, params, loss)
  assert float(loss(out)) < float(loss(params))


def test_default_structural_integers_stay_static():
  # Left at their defaults (None), rank, k and num_queries are not injected,
  # so even a jitted init works.
  params, loss = problem()
  tx = optax.inject_hyperparams(zojax.zo_mopi)(learning_rate=1e-2)
  # The default rank 64 and k 32 clamp to this small matrix: zojax says so.
  with pytest.warns(UserWarning, match="clamped|smaller dimension"):
    state = jax.jit(tx.init)(params)
  assert "rank" not in state.hyperparams and "k" not in state.hyperparams
  run(tx, params, loss, steps=1, jit_init=True)


@pytest.mark.parametrize("argument", ["num_queries", "rank", "k"])
def test_traced_structural_integer_at_init_says_what_to_do(argument):
  params, _ = problem()
  # rank 3 and k 2 (k < rank, and the rank fits the 8 x 6 matrix): no clamping to warn about.
  sizes = {"num_queries": 2, "rank": 3, "k": 2}
  fixed = {"rank": 3, "k": 2}
  fixed.pop(argument, None)
  tx = optax.inject_hyperparams(zojax.zo_mopi)(
    learning_rate=1e-2, **fixed, **{argument: sizes[argument]}
  )
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)(params)
  # The same, with static_args: fine under jit.
  tx = optax.inject_hyperparams(zojax.zo_mopi, static_args=(argument, *fixed))(
    learning_rate=1e-2, **fixed, **{argument: sizes[argument]}
  )
  jax.jit(tx.init)(params)


# ---------------------------------------------------------------------------
# Construction-time checks.


BAD_REAL = [
  ("learning_rate", float("nan"), ValueError, "finite"),
  ("learning_rate", float("inf"), ValueError, "finite"),
  ("learning_rate", -1e-3, ValueError, "negate the loss"),
  ("learning_rate", "1e-3", TypeError, "the string '1e-3'"),
  ("eps", 0.0, ValueError, "eps must lie in"),
  ("eps", -1e-3, ValueError, "eps must lie in"),
  ("eps", 2.0, ValueError, "not a stability constant"),
  ("eps", float("nan"), ValueError, "finite"),
  ("eps", "1e-3", TypeError, "eps must be a real number"),
]


@pytest.mark.parametrize("argument, value, error, message", BAD_REAL)
@pytest.mark.parametrize("name", PRESETS)
def test_bad_real_hyperparameters_fail_at_construction(name, argument, value, error, message):
  preset = getattr(zojax, name)
  kw = {"learning_rate": 1e-2, **small(name), argument: value}
  with pytest.raises(error, match=message):
    preset(**kw)


@pytest.mark.parametrize(
  "name, argument, value, error",
  [
    ("mezo", "weight_decay", -0.1, ValueError),
    ("mezo", "weight_decay", float("nan"), ValueError),
    ("mezo_bcd", "weight_decay", float("inf"), ValueError),
    ("zo_mopi", "beta", 1.0, ValueError),
    ("zo_mopi", "beta", -0.1, ValueError),
    ("lozo_m", "beta", 1.5, ValueError),
    ("zo_muon", "vector_learning_rate", float("nan"), ValueError),
    ("zo_mopi", "vector_learning_rate", -1.0, ValueError),
    ("lozo", "paper_scaling", "no", TypeError),
    ("zo_mopi", "anchored", 1, TypeError),
    ("zo_mopi", "k", 0, ValueError),
    ("zo_muon", "rank", 2.0, TypeError),
    ("zo_muon", "num_queries", "4", TypeError),
    ("subzero", "refresh_every", 0, ValueError),
    ("mezo_bcd", "switch_every", 0.5, TypeError),
  ],
)
def test_bad_hyperparameters_name_the_argument(name, argument, value, error):
  preset = getattr(zojax, name)
  with pytest.raises(error, match=argument):
    preset(**{"learning_rate": 1e-2, **small(name), argument: value})


def test_a_schedule_is_checked_at_its_first_value():
  with pytest.raises(ValueError, match=r"schedule's value at step 0.*finite"):
    zojax.mezo(lambda count: jnp.nan * count)
  with pytest.raises(ValueError, match="schedule's value at step 0"):
    zojax.zo_muon(optax.linear_schedule(-1e-2, 0.0, 10))
  zojax.mezo(optax.cosine_decay_schedule(1e-3, 100))  # a valid schedule passes


def test_numpy_and_array_integers_are_accepted():
  params, loss = problem()
  for value in (np.int64(2), np.int32(2), jnp.asarray(2)):
    tx = zojax.zo_muon(1e-2, rank=value, num_queries=value)
    state = tx.init(params)
    bases = optax.tree_utils.tree_get(state, "SubspaceState").bases
    assert [jnp.shape(b) for b in bases if not isinstance(b, tuple)] == [(6, 2)]  # w's basis
    assert optax.tree_utils.tree_get(state, "ZOGradState").projected_grads.shape == (2,)
    run(tx, params, loss, steps=1)
  zojax.mezo(np.float32(1e-3), eps=np.float64(1e-3))


def test_small_eps_warns():
  with pytest.warns(UserWarning, match="rounds away"):
    zojax.zo_grad(eps=1e-7)


def test_hyperparams_helpers():
  assert hyperparams.integer("n", np.int16(3)) == 3
  assert hyperparams.real("x", np.float32(0.5), low=0.0) == 0.5
  with pytest.raises(TypeError, match="scalar"):
    hyperparams.real("x", np.ones(2))
  with pytest.raises(TypeError, match="integer"):
    hyperparams.integer("n", jnp.asarray(2.0))
  with pytest.raises(ValueError, match=r"x must lie in \[0, 1\)"):
    hyperparams.real("x", 1.0, low=0.0, high=1.0, high_open=True)
  assert hyperparams.flag("f", np.bool_(True)) is True

  def traced(x):
    assert hyperparams.real("x", x, low=0.0) is x  # tracers pass unchecked
    return x

  jax.jit(traced)(jnp.float32(-1.0))


# ---------------------------------------------------------------------------
# A state from another configuration.


@pytest.mark.parametrize(
  "name, built, used, message",
  [
    ("zo_mopi", {"rank": 3, "k": 1}, {"rank": 3, "k": 2}, "rank 1"),
    ("zo_mopi", {"rank": 2}, {"rank": 3}, "another rank"),
    ("zo_muon", {"num_queries": 2}, {"num_queries": 3}, "num_queries=2"),
    ("mezo", {"num_queries": 1}, {"num_queries": 2}, "num_queries=1"),
    ("lozo", {"rank": 1}, {"rank": 2}, "another rank"),
    ("subzero", {"rank": 1}, {"rank": 2}, "another rank"),
  ],
)
def test_a_state_from_another_configuration_is_refused(name, built, used, message):
  preset = getattr(zojax, name)
  params, loss = problem()
  state = preset(learning_rate=1e-2, **small(name, **built)).init(params)
  tx = preset(learning_rate=1e-2, **small(name, **used))
  with pytest.raises(ValueError, match=message):
    tx.update(None, state, params, value_fn=loss)


# ---------------------------------------------------------------------------
# Valid inputs that used to be refused.


@pytest.mark.parametrize("name", PRESETS)
def test_python_float_and_empty_leaves_are_parameters(name):
  # A Python float is a JAX pytree leaf like any scalar; a 0-size matrix has
  # nothing to perturb. Neither may break a step, and the float must train.
  preset = getattr(zojax, name)
  params = {"w": jnp.linspace(-0.5, 0.5, 9).reshape(3, 3), "s": 0.5, "e": jnp.zeros((0, 3))}

  def loss(p):
    return jnp.sum((p["w"] @ jnp.ones(3) - 1.0) ** 2) * p["s"] ** 2 + jnp.sum(p["e"])

  kw = small(name)
  if name == "mezo_bcd":
    kw["blocks"] = {"w": 0, "s": 1, "e": 0}
    kw["order"] = "descending"  # the first step trains block 1, the float
  tx = preset(learning_rate=1e-2, **kw)
  out, _ = run(tx, params, loss, steps=2)
  assert out["e"].shape == (0, 3)
  assert float(out["s"]) != 0.5
