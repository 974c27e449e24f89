"""`NO_GRADIENT`: what a zojax optimizer's ``update`` is given in place of a gradient.

A zeroth-order optimizer makes its gradient estimate inside ``update``, from
the loss, so it is given none. ``None`` says so and costs nothing, but optax
transforms pass ``None`` through unchanged: in ``optax.chain(
optax.clip_by_global_norm(1.0), zojax.mezo(...))`` the clip, placed before
the estimator as optax's usual order would have it, silently clips nothing.
`NO_GRADIENT` says the same as ``None`` to every zojax transform, but any
transform that tries to read it as a gradient (clip it, scale it, average it
as ``optax.MultiSteps`` does, test it as ``optax.apply_if_finite`` does)
fails with a message that says what to do: put the transform after the
estimator, or use the zojax counterpart. Why not zeros or a params-shaped
placeholder: a transform's output from zeros is arrays again, which the
estimator cannot tell from a gradient someone meant to give it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NO_GRADIENT", "NoGradient", "is_no_gradient"]

MESSAGE = (
  "zojax.NO_GRADIENT is what a zeroth-order optimizer is given instead of a gradient (it "
  "computes its estimate from the loss), and something tried to use it as a gradient: a "
  "transform placed before the estimator, or an optax wrapper that reads the incoming "
  "updates. Put such transforms after the estimator, e.g. optax.chain(zojax.zo_grad(), "
  "optax.clip_by_global_norm(1.0), optax.sgd(lr)); accumulate with zojax.multi_steps(tx, k) "
  "instead of optax.MultiSteps; non-finite steps are already skipped by the estimator (no "
  "optax.apply_if_finite needed); train some leaves with the preset's mask= instead of "
  "optax.masked. See 'Wrappers' in the docs' optax page."
)


class NoGradient:
  """The type of `NO_GRADIENT` (one instance); every use as an array raises `MESSAGE`."""

  __slots__ = ()

  def __repr__(self) -> str:
    # JAX's "is not a valid JAX type" error (optax.MultiSteps, apply_if_finite) shows this.
    return f"zojax.NO_GRADIENT ({MESSAGE})"

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    raise TypeError(MESSAGE)

  def _refuse(self, *args, **kwargs):
    raise TypeError(MESSAGE)

  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
  __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _refuse
  __neg__ = __abs__ = __array__ = __float__ = __bool__ = _refuse
  __lt__ = __le__ = __gt__ = __ge__ = _refuse


NO_GRADIENT = NoGradient()


def is_no_gradient(updates: Any) -> bool:
  """Whether ``updates`` is `NO_GRADIENT`."""
  return isinstance(updates, NoGradient)
