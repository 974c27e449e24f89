"""zojax: zeroth-order training in JAX, as optax transformations.

Fine-tune a network from forward passes alone, with the memory of inference.
"""

from zojax import (
  accumulation,
  array_leaves,
  block_coordinates,
  hyperparams,
  keys,
  layouts,
  no_gradient,
  orthogonalizers,
  perturb_at_use,
  perturbations,
  precision,
  subspaces,
  testing,
  train_state,
  trajectory,
)
from zojax.accumulation import MultiStepsState, multi_steps
from zojax.array_leaves import check_array_leaves
from zojax.block_coordinates import (
  BlockCoordinateState,
  StackedBlocks,
  active_block,
  block_coordinate,
  top_level_blocks,
)
from zojax.estimators import (
  ESTIMATORS,
  MAX_PROJECTED_GRAD,
  ZOGradState,
  forwards_per_step,
  zo_grad,
)
from zojax.layouts import equinox_dimension_numbers
from zojax.no_gradient import NO_GRADIENT
from zojax.orthogonalizers import PowerIterationState, orthogonalize
from zojax.perturbations import DISTRIBUTIONS, sample_direction
from zojax.precision import (
  MasterWeightsState,
  StochasticRoundingState,
  master_weights,
  stochastic_round,
  stochastic_rounding,
)
from zojax.presets import (
  lozo,
  lozo_m,
  matrix_mask,
  mezo,
  mezo_bcd,
  split_learning_rates,
  subzero,
  zo_mopi,
  zo_muon,
)
from zojax.subspaces import SubspaceState, coordinate_dimension_numbers, subspace
from zojax.train_state import ZOTrainState

__version__ = "0.1.0"

__all__ = [
  "NO_GRADIENT",
  "no_gradient",
  "accumulation",
  "MultiStepsState",
  "multi_steps",
  "array_leaves",
  "check_array_leaves",
  "equinox_dimension_numbers",
  "layouts",
  "BlockCoordinateState",
  "DISTRIBUTIONS",
  "ESTIMATORS",
  "MAX_PROJECTED_GRAD",
  "ZOGradState",
  "forwards_per_step",
  "hyperparams",
  "keys",
  "MasterWeightsState",
  "StochasticRoundingState",
  "master_weights",
  "precision",
  "stochastic_round",
  "stochastic_rounding",
  "matrix_mask",
  "mezo",
  "mezo_bcd",
  "StackedBlocks",
  "active_block",
  "block_coordinate",
  "block_coordinates",
  "top_level_blocks",
  "lozo",
  "lozo_m",
  "split_learning_rates",
  "subzero",
  "zo_mopi",
  "zo_muon",
  "orthogonalizers",
  "perturb_at_use",
  "perturbations",
  "subspaces",
  "sample_direction",
  "SubspaceState",
  "PowerIterationState",
  "orthogonalize",
  "subspace",
  "coordinate_dimension_numbers",
  "testing",
  "train_state",
  "ZOTrainState",
  "trajectory",
  "zo_grad",
]
