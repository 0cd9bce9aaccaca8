"""Loss balancers: objects that turn term values (and per-term gradients) into term weights.

One small protocol. A balancer is built once with its phase's term names (creating its state as
variables, which the Trainer checkpoints), then called once per step inside the compiled step:

    weighting = balancer.weights(values, step, gram)   # values: [T] global term values
    weighting.weights   # [T] multipliers; weight/<term> = schedule weight x this
    weighting.mixing    # None, or [T, T]: gradient surgery (PCGrad, Aligned-MTL)
    weighting.updates   # (variable, new value) pairs, assigned only if the step is applied

* Loss-based balancers (`needs_gradients = False`: `EMANormalize`, `UncertaintyWeighting`,
  `DWA`, `FAMO`) see only the values, and the step takes one backward pass of the weighted total.
* Gradient-based balancers (`needs_gradients = True`: `GradNorm`, `PCGrad`, `MGDA`,
  `AlignedMTL`) also get the Gramian ``G_ij = g_i . g_j`` of the per-term gradients
  ``g_i = d(schedule_i L_i)/d theta`` over their target (the phase's variables, or those of the
  layer named by `layer`). Each of these methods is a function of the Gramian. GradNorm and
  MGDA return loss weights: the update is ``sum_i w_i g_i``. PCGrad and Aligned-MTL leave the
  weights at 1 and change the gradients instead, but their modified gradients are linear
  combinations of the g_i, ``g_i' = sum_k C_ik g_k``: they return the mixing matrix C, and the
  update is ``sum_i g_i' = sum_k (1'C)_k g_k``. No gradient is ever concatenated or copied.
  `NashMTL` and `FairGrad` (module `bargaining`) solve a small nonlinear system on the Gramian.
  `DBMTL` keeps averaged past gradients (`needs_stacks`) and returns the update itself.

Values and Gramians are global (all-reduced across replicas) and every computation here is
deterministic (PCGrad's random order is a stateless function of the step), so all replicas
compute the same weights and state.

`parse("gradnorm:1.5")` builds a balancer from a flag value (see `FORMS`). The package holds
one module per family of methods (`loss_based`, `gradient_norm`, `surgery`, `min_norm`) and
`base` with the protocol.
"""

from __future__ import annotations

from termwise.trainer.balancers import (
    bargaining,
    conflict_free,
    dual_cone,
    gradient_norm,
    loss_based,
    min_norm,
    surgery,
)
from termwise.trainer.balancers.bargaining import FairGrad, NashMTL
from termwise.trainer.balancers.base import Balancer, Form, Weighting
from termwise.trainer.balancers.conflict_free import IMTLG, ConFIG
from termwise.trainer.balancers.dual_cone import DualProj, UPGrad
from termwise.trainer.balancers.gradient_norm import DBMTL, GradNorm
from termwise.trainer.balancers.loss_based import DWA, FAMO, EMANormalize, UncertaintyWeighting
from termwise.trainer.balancers.min_norm import MGDA, CAGrad
from termwise.trainer.balancers.surgery import AlignedMTL, PCGrad

# name (as `parse` reads it) -> its form; each family's module declares its own.
_FORMS: dict[str, Form] = {
    **loss_based.FORMS,
    **gradient_norm.FORMS,
    **surgery.FORMS,
    **min_norm.FORMS,
    **dual_cone.FORMS,
    **conflict_free.FORMS,
    **bargaining.FORMS,
}
_ALIASES = {
    "alignedmtl": "aligned_mtl",
    "imtlg": "imtl_g",
    "nashmtl": "nash_mtl",
    "dbmtl": "db_mtl",
}

FORMS = (*(form.usage for form in _FORMS.values()), "none")
TARGETS = ("@layer=NAME", "@representation=NAME")  # a gradient-based form's optional suffix


def parse(spec: str | Balancer | None) -> Balancer | None:
    """Builds a balancer from its string form (a `--balancer` flag value).

    Accepted forms: `FORMS` (for example ``gradnorm:1.5`` or ``pcgrad:3``), and ``none`` (or an
    empty string, or None: no balancer). Names are case-insensitive, and ``-`` reads as ``_``.
    A gradient-based form may end with ``@layer=NAME`` (the Gramian over that layer's
    variables) or ``@representation=NAME`` (over the gradients at that layer's output, MGDA-UB;
    see `Balancer`), e.g. ``mgda@representation=encoder``. A `Balancer` is returned as it is.

    Raises:
        ValueError: naming the string and listing the accepted forms.
    """
    if spec is None or isinstance(spec, Balancer):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"A balancer must be a string such as 'pcgrad', got {spec!r}.")
    body, *options = spec.strip().split("@")
    name, *fields = body.split(":")
    name = name.lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    try:
        if name in ("none", ""):
            if fields or options:
                raise ValueError("takes no fields")
            return None
        if name not in _FORMS:
            raise ValueError(f"unknown balancer {name!r}")
        balancer = _FORMS[name].build(fields)
        target = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("layer", "representation") or key in target:
                raise ValueError(
                    f"{option!r} after '@' must be layer=NAME or representation=NAME, once"
                )
            target[key] = value
        return balancer.target(**target) if target else balancer
    except ValueError as error:
        raise ValueError(
            f"Balancer {spec!r}: {str(error).rstrip('.')}; accepted forms: {', '.join(FORMS)}."
        ) from None


__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "FORMS",
    "TARGETS",
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "EMANormalize",
    "FairGrad",
    "Form",
    "GradNorm",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "UncertaintyWeighting",
    "Weighting",
    "parse",
]
