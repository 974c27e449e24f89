"""Weight layouts of other JAX libraries, as dimension numbers.

zojax views a leaf as a matrix through `optax.contrib.MuonDimensionNumbers`
(``reduction_axis`` = fan-in, ``output_axis`` = fan-out; see
`zojax.subspace`). Its default rule reads 2-D leaves as Flax ``(in, out)``
kernels and larger ones as ``(..., out)`` conv kernels. Equinox stores
weights the other way round, PyTorch-style: `equinox.nn.Linear.weight` is
``(out, in)`` and `equinox.nn.Conv`'s is ``(out, in, *kernel)``. Under the
default rule the subspace presets (`zojax.zo_muon`, `zojax.zo_mopi`,
`zojax.lozo`, `zojax.subzero`) would then put the basis on the wrong axis
without any error, since the shapes are valid either way.

`equinox_dimension_numbers` returns the numbers that read Equinox weights
right. It recognises layers by their class rather than by shape (a square
weight looks the same in both layouts), so it walks the model's own pytree
and needs the Equinox modules in it: call it on the arrays of
``eqx.partition(model, eqx.is_inexact_array)``, which keeps the module
classes with ``None`` in place of the static parts. Equinox is imported
inside the function, so `import zojax` never imports it.
"""

from __future__ import annotations

from typing import Any

import jax
from optax.contrib import MuonDimensionNumbers

from zojax import array_leaves
from zojax.orthogonalizers import default_dimension_numbers

__all__ = ["equinox_dimension_numbers"]


def _weight_numbers(weight: Any, num_spatial_dims: int) -> MuonDimensionNumbers:
  """``(*batch, out, in, *kernel)``: reduction over in and kernel, output out.

  Leading axes beyond the layer's own are batch axes (layers stacked with
  `equinox.filter_vmap` and run by `jax.lax.scan`): each slice gets its own
  matrix view.
  """
  out = weight.ndim - 2 - num_spatial_dims
  if out < 0:
    raise ValueError(
      f"An Equinox layer's weight of shape {weight.shape} has fewer axes than "
      f"(out, in{', *kernel' if num_spatial_dims else ''})."
    )
  reduction = tuple(range(out + 1, weight.ndim))
  return MuonDimensionNumbers(
    reduction_axis=reduction if len(reduction) > 1 else reduction[0], output_axis=out
  )


def equinox_dimension_numbers(params: Any) -> Any:
  """Dimension numbers for the array part of an Equinox model.

  * `equinox.nn.Linear` weights ``(out, in)``: reduction axis 1, output
    axis 0.
  * `equinox.nn.Conv` and `equinox.nn.ConvTranspose` weights
    ``(out, in, *kernel)``: reduction axes ``1 ..``, output axis 0.
  * Weights with extra leading axes (layers stacked by
    `equinox.filter_vmap` for a scan): those axes are batch axes, one
    matrix per slice.
  * Every other leaf (biases, norms, `equinox.nn.Embedding` tables, arrays
    of your own modules): the default rule,
    `zojax.orthogonalizers.default_dimension_numbers` (None below two
    axes). Give explicit numbers for custom matrix leaves stored
    ``(out, in)``.

  Pass the result as ``weight_dimension_numbers=`` to `zojax.subspace`,
  `zojax.orthogonalize` or the subspace presets.

  Args:
    params: the arrays of an Equinox model, ``eqx.partition(model,
      eqx.is_inexact_array)[0]`` (``None`` in place of non-arrays).

  Returns:
    A pytree with the structure of ``params`` whose leaves are
    `optax.contrib.MuonDimensionNumbers` or None.

  Raises:
    TypeError: if ``params`` holds a leaf that is not an array (a whole model
      was passed; see `zojax.array_leaves.check_array_leaves`).
    ImportError: if Equinox is not installed.

  Examples:
    >>> import equinox as eqx, jax, zojax
    >>> model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    >>> params, static = eqx.partition(model, eqx.is_inexact_array)
    >>> dims = zojax.equinox_dimension_numbers(params)
    >>> dims.layers[0].weight
    MuonDimensionNumbers(reduction_axis=1, output_axis=0)
    >>> tx = zojax.zo_muon(1e-2, rank=4, weight_dimension_numbers=dims)
  """
  import equinox as eqx  # Only here: zojax does not depend on Equinox.

  array_leaves.check_array_leaves(params)
  layers = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
  weight = jax.tree_util.GetAttrKey("weight")

  def layer_numbers(layer):
    spatial = getattr(layer, "num_spatial_dims", 0)
    return jax.tree_util.tree_map_with_path(
      lambda path, x: (
        _weight_numbers(x, spatial) if path == (weight,) else default_dimension_numbers(x)
      ),
      layer,
    )

  def visit(node):
    if isinstance(node, layers):
      return layer_numbers(node)
    return default_dimension_numbers(node)

  return jax.tree.map(visit, params, is_leaf=lambda x: isinstance(x, layers))
