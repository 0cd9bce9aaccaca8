"""UPGrad and DualProj against brute-force projections onto the dual cone, KKT checked."""

import numpy as np
import pytest
from test_solvers import (
    CASE_IDS,
    CASES,
    assert_close,
    assert_cone_kkt,
    assert_direction,
    balancer_update,
    brute_cone_projection,
    train_two_terms,
)

from termwise.trainer import balancers


def projection(grads, u):
    """The projection of u'J onto the dual cone, from the unit gradients (the same cone)."""
    norms = np.linalg.norm(grads, axis=1)
    nonzero = norms > 0
    if not nonzero.any():
        return np.zeros(grads.shape[1])
    units = grads[nonzero] / norms[nonzero, None]
    _, v = brute_cone_projection(units, u[nonzero] * norms[nonzero])
    assert_cone_kkt(units, u[nonzero] * norms[nonzero], v)
    return v @ units


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_upgrad_matches_the_mean_of_the_projections(name, grads):
    count = len(grads)
    update, weighting = balancer_update(balancers.UPGrad(), grads)
    weights = weighting.weights.numpy()
    assert np.all(np.isfinite(weights)) and np.all(weights >= 1.0 / count - 1e-6)
    expected = sum(projection(grads, np.eye(count)[i] / count) for i in range(count))
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    assert_close(update, expected, scale=scale)
    norms = np.linalg.norm(grads, axis=1)  # in the cone: no term's gradient conflicts
    assert np.all(grads @ update >= -1e-5 * norms * scale)


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_dualproj_matches_the_projection_of_the_mean(name, grads):
    count = len(grads)
    update, weighting = balancer_update(balancers.DualProj(), grads)
    weights = weighting.weights.numpy()
    assert np.all(np.isfinite(weights)) and np.all(weights >= 1.0 / count - 1e-6)
    expected = projection(grads, np.full(count, 1.0 / count))
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    assert_close(update, expected, scale=scale)
    norms = np.linalg.norm(grads, axis=1)
    assert np.all(grads @ update >= -1e-5 * norms * scale)


def test_without_conflict_both_are_the_mean():
    g = np.array([[1.0, 0.2, 0.0], [0.5, 1.0, 0.0], [0.0, 0.1, 1.0]])  # every dot >= 0
    for balancer in (balancers.UPGrad(), balancers.DualProj()):
        update, weighting = balancer_update(balancer, g)
        np.testing.assert_allclose(weighting.weights.numpy(), 1.0 / 3.0, rtol=1e-6)
        np.testing.assert_allclose(update, g.mean(axis=0), rtol=1e-6)


def test_two_opposite_gradients_give_zero():
    g = np.array([[1.0, 2.0], [-1.0, -2.0]])  # the dual cone is the line orthogonal to them
    for balancer in (balancers.UPGrad(), balancers.DualProj()):
        update, _ = balancer_update(balancer, g)
        np.testing.assert_allclose(update, 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "spec, kind",
    [("upgrad", balancers.UPGrad), ("UPGrad", balancers.UPGrad), ("dualproj", balancers.DualProj)],
)
def test_parse(spec, kind):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind) and balancer.layer is None
    assert isinstance(balancers.parse(balancer.spec), kind)
    with pytest.raises(ValueError, match=rf"'{spec}:1'.*takes at most 0 fields"):
        balancers.parse(f"{spec}:1")
    assert kind(layer="hidden").layer == "hidden"


@pytest.mark.parametrize("spec", ["upgrad", "dualproj"])
def test_in_the_trainer(spec):
    train_two_terms(spec)
