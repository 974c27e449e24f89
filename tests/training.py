"""A jitted multi-step training loop shared by the tests."""

import jax
import optax


def scan_steps(tx, loss, steps: int):
  """Returns a jitted ``run(params, state) -> (params, state)`` doing ``steps`` ZO steps."""

  @jax.jit
  def run(params, state):
    def body(carry, _):
      p, s = carry
      updates, s = tx.update(None, s, p, value_fn=loss)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(body, (params, state), None, length=steps)[0]

  return run
