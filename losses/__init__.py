"""Per-example loss functions and penalties, and Keras layers that add penalties with `add_loss`.

Every function returns one value per example ([batch]) unless its docstring says it is a batch
statistic (a scalar); the Trainer does the reduction, so terms mean the same on any number of
replicas. A layer names each value it adds with `add_term(self, "name", value)` (the term
`<layer>/name`, the same in training and evaluation).
"""

from termwise.losses.adversarial import (
    DriftPenalty,
    drift_penalty,
    feature_matching,
    gradient_penalty,
    nonsaturating_discriminator_loss,
    nonsaturating_generator_loss,
    r1_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from termwise.losses.divergences import free_bits_kl, gaussian_kl, gaussian_kl_per_dimension
from termwise.losses.layers import (
    ActivityPenalty,
    BernoulliSparsityKL,
    FeatureDiversity,
    GaussianActivityKL,
    L1ActivitySparsity,
    SummedPenaltyWarning,
    add_penalty,
    penalize,
)
from termwise.losses.likelihoods import (
    bernoulli_nll,
    mean_over_outputs,
    mean_squared_error,
    weighted_binary_crossentropy,
)
from termwise.losses.penalties import (
    bernoulli_sparsity_kl,
    feature_diversity,
    fraction_below,
    gaussian_moments_kl,
    l1_activity,
)
from termwise.trainer.terms import add_term

__all__ = [
    "ActivityPenalty",
    "BernoulliSparsityKL",
    "DriftPenalty",
    "FeatureDiversity",
    "GaussianActivityKL",
    "L1ActivitySparsity",
    "SummedPenaltyWarning",
    "add_penalty",
    "add_term",
    "bernoulli_nll",
    "bernoulli_sparsity_kl",
    "drift_penalty",
    "feature_diversity",
    "feature_matching",
    "fraction_below",
    "free_bits_kl",
    "gaussian_kl",
    "gaussian_kl_per_dimension",
    "gaussian_moments_kl",
    "gradient_penalty",
    "l1_activity",
    "mean_over_outputs",
    "mean_squared_error",
    "nonsaturating_discriminator_loss",
    "nonsaturating_generator_loss",
    "penalize",
    "r1_penalty",
    "wasserstein_critic_loss",
    "wasserstein_generator_loss",
    "weighted_binary_crossentropy",
]
