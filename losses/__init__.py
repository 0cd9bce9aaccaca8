"""Per-example loss functions and penalties, and Keras layers that add penalties with `add_loss`.

Every function returns one value per example ([batch]) unless its docstring says it is a batch
statistic (a scalar); the Trainer does the reduction, so terms mean the same on any number of
replicas.
"""

from losses.divergences import free_bits_kl, gaussian_kl, gaussian_kl_per_dimension
from losses.likelihoods import (
    bernoulli_nll,
    mean_over_outputs,
    mean_squared_error,
    weighted_binary_crossentropy,
)

__all__ = [
    "bernoulli_nll",
    "free_bits_kl",
    "gaussian_kl",
    "gaussian_kl_per_dimension",
    "mean_over_outputs",
    "mean_squared_error",
    "weighted_binary_crossentropy",
]
