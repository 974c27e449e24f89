"""zojax: zeroth-order training in JAX, as optax transformations.

Fine-tune a network from forward passes alone, with the memory of inference.
"""

from zojax import keys, orthogonalizers, perturbations, subspaces
from zojax.estimators import ESTIMATORS, ZOGradState, forwards_per_step, zo_grad
from zojax.orthogonalizers import PowerIterationState, orthogonalize
from zojax.perturbations import DISTRIBUTIONS, sample_direction
from zojax.presets import (
  lozo,
  lozo_m,
  matrix_mask,
  mezo,
  split_learning_rates,
  subzero,
  zo_mopi,
  zo_muon,
)
from zojax.subspaces import SubspaceState, subspace

__version__ = "0.1.0"

__all__ = [
  "DISTRIBUTIONS",
  "ESTIMATORS",
  "ZOGradState",
  "forwards_per_step",
  "keys",
  "matrix_mask",
  "mezo",
  "lozo",
  "lozo_m",
  "split_learning_rates",
  "subzero",
  "zo_mopi",
  "zo_muon",
  "orthogonalizers",
  "perturbations",
  "subspaces",
  "sample_direction",
  "SubspaceState",
  "PowerIterationState",
  "orthogonalize",
  "subspace",
  "zo_grad",
]
