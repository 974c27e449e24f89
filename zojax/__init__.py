"""zojax: zeroth-order training in JAX, as optax transformations.

Fine-tune a network from forward passes alone, with the memory of inference.
"""

from zojax import keys
from zojax import perturbations
from zojax.estimators import ESTIMATORS
from zojax.estimators import ZOGradState
from zojax.estimators import forwards_per_step
from zojax.estimators import zo_grad
from zojax.perturbations import DISTRIBUTIONS
from zojax.perturbations import sample_direction
from zojax.presets import matrix_mask
from zojax.presets import mezo

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
