"""zojax: zeroth-order training in JAX, as optax transformations.

Fine-tune a network from forward passes alone, with the memory of inference.
"""

from zojax import keys, perturbations
from zojax.estimators import ESTIMATORS, ZOGradState, forwards_per_step, zo_grad
from zojax.perturbations import DISTRIBUTIONS, sample_direction
from zojax.presets import matrix_mask, mezo

__version__ = "0.1.0"

__all__ = [
  "DISTRIBUTIONS",
  "ESTIMATORS",
  "ZOGradState",
  "forwards_per_step",
  "keys",
  "matrix_mask",
  "mezo",
  "perturbations",
  "sample_direction",
  "zo_grad",
]
