"""Termwise: a TensorFlow / Keras 3 training loop in which every loss term is first-class.

    import termwise as tw

    trainer = tw.Trainer(model, keras.optimizers.Adam(1e-3), loss=tw.losses.mean_squared_error,
                         weights={"kl": "linear:0:1:2000"}, balancer="pcgrad", log_dir="runs/x")

The everyday names live here, as `keras.Model` does in `keras`:

    Trainer, NonFiniteLossError    the training loop (`termwise.trainer`)
    schedules                      weights as functions of the step
    balancers                      loss balancers (`balancers.parse("gradnorm:1.5")`)
    losses                         per-example losses, penalties and penalty layers

Everything else stays under its subpackage: `termwise.trainer` (the loop's parts),
`termwise.losses` and `termwise.models` (the reference models and their jobs, imported on
demand: `from termwise.models import vae`).

The repository keeps these subpackages as the top-level folders `trainer/`, `losses/` and
`models/`; setuptools installs them inside this package (`package_dir` in setup.cfg), so that
`termwise` is the only name an install adds to site-packages. In a source checkout (running
the tests or the scripts from a clone without installing) the folders sit beside this one, and
the search path below finds them there.
"""

import os as _os

__version__ = "0.2.0"


def _source_checkout() -> list[str]:
    """The clone's root, when `trainer/`, `losses/` and `models/` sit beside this folder."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "trainer")):  # installed: the subpackages are inside
        return []
    root = _os.path.dirname(here)
    folders = ("trainer", "losses", "models")
    if all(_os.path.isfile(_os.path.join(root, f, "__init__.py")) for f in folders):
        return [root]
    return []


__path__ += [p for p in _source_checkout() if p not in __path__]

from termwise import losses  # noqa: E402

# The reference models' layers register themselves with Keras (`termwise>Sample`, ...) when
# their modules load, so that a saved VAE, LSTM or GAN reloads after `import termwise` alone.
from termwise.models import gan as _gan  # noqa: E402, F401
from termwise.models import lstm as _lstm  # noqa: E402, F401
from termwise.models import vae as _vae  # noqa: E402, F401
from termwise.trainer import (  # noqa: E402
    NonFiniteLossError,
    Trainer,
    balancers,
    schedules,
)

__all__ = [
    "NonFiniteLossError",
    "Trainer",
    "__version__",
    "balancers",
    "losses",
    "schedules",
]
