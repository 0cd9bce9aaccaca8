"""IMTL-G and ConFIG against their published formulas, computed on the gradients themselves."""

import numpy as np
import pytest
from test_solvers import (
    CASES,
    assert_close,
    assert_direction,
    balancer_update,
    train_two_terms,
)

from termwise.trainer import balancers


def unit_rows(grads):
    norms = np.linalg.norm(grads, axis=1)
    nonzero = norms > 0
    return grads[nonzero], grads[nonzero] / norms[nonzero, None], nonzero


def imtl_g_reference(grads):
    """Liu et al.'s closed form: alpha_{2..T} = g_1 U'(D U')^-1, alpha_1 = 1 - sum (float64).

    D and U hold the differences g_1 - g_t and u_1 - u_t of the gradients and of their unit
    vectors; the update sum_t alpha_t g_t then has equal projections on every u_t. Zero
    gradients are left out (their weight is 0). The inverse is a pseudo-inverse, for
    dependent gradients (torchjd's generalisation).
    """
    kept, units, nonzero = unit_rows(grads)
    if len(kept) == 0:
        return np.zeros(grads.shape[1])
    d = kept[:1] - kept[1:]
    u = units[:1] - units[1:]
    alpha = kept[0] @ u.T @ np.linalg.pinv(d @ u.T, rcond=1e-10) if len(kept) > 1 else []
    alpha = np.concatenate([[1.0 - np.sum(alpha)], alpha])
    return alpha @ kept


def config_reference(grads):
    """The official ConFIG: x = pinv(U) 1 (least squares), update = (sum_i g_i . x_hat) x_hat."""
    kept, units, _ = unit_rows(grads)
    if len(kept) == 0:
        return np.zeros(grads.shape[1])
    x = np.linalg.lstsq(units, np.ones(len(units)), rcond=None)[0]
    x_hat = x / np.linalg.norm(x)
    return np.sum(kept @ x_hat) * x_hat


def config_double_reference(g1, g2):
    """The official two-gradient form: along the sum of the orthogonalised unit gradients."""
    u1, u2 = g1 / np.linalg.norm(g1), g2 / np.linalg.norm(g2)
    o1, o2 = g2 - (g2 @ u1) * u1, g1 - (g1 @ u2) * u2  # o1 is orthogonal to g1, o2 to g2
    o1, o2 = o1 / np.linalg.norm(o1), o2 / np.linalg.norm(o2)
    # Equal weights: the direction whose projections on u1 and u2 are equal.
    direction = o1 / (o1 @ u2) + o2 / (o2 @ u1)
    direction /= np.linalg.norm(direction)
    return (g1 @ direction + g2 @ direction) * direction


# Cases where a direction with equal angles exists: not "planar" (three gradients in a plane)
# or "wide" (five in three dimensions), where the least-squares solution is kept, see below.
WELL_POSED = [(name, g) for name, g in CASES if name not in ("planar", "wide")]


@pytest.mark.parametrize("name, grads", WELL_POSED, ids=[n for n, _ in WELL_POSED])
def test_imtl_g_matches_the_closed_form(name, grads):
    update, weighting = balancer_update(balancers.IMTLG(), grads)
    weights = weighting.weights.numpy()
    assert np.all(np.isfinite(weights))
    expected = imtl_g_reference(grads)
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    if name != "all_zero":
        assert weights.sum() == pytest.approx(1.0, rel=1e-5)
        assert_close(update, expected, scale=scale)
        _, units, _ = unit_rows(grads)
        cosines = units @ update / np.linalg.norm(update)  # impartial: equal projections
        np.testing.assert_allclose(cosines, cosines[0], atol=1e-5)


@pytest.mark.parametrize("name, grads", WELL_POSED, ids=[n for n, _ in WELL_POSED])
def test_config_matches_the_official_formula(name, grads):
    update, weighting = balancer_update(balancers.ConFIG(), grads)
    assert np.all(np.isfinite(weighting.weights.numpy()))
    expected = config_reference(grads)
    scale = np.abs(grads).max() + 1e-300
    assert_direction(update, expected, scale=scale)
    assert_close(update, expected, scale=scale)
    if name != "all_zero":
        _, units, _ = unit_rows(grads)
        cosines = units @ update / np.linalg.norm(update)  # equal and positive
        np.testing.assert_allclose(cosines, cosines[0], atol=1e-5)
        assert cosines[0] > 0


def test_dependent_gradients_keep_the_least_norm_direction():
    # No direction has equal angles with all the gradients; both methods use the least-squares
    # (pseudo-inverse) solution, like torch.linalg.pinv and lstsq.
    for name in ("planar", "wide"):
        grads = dict(CASES)[name]
        _, units, _ = unit_rows(grads)
        x = np.linalg.lstsq(units, np.ones(len(units)), rcond=None)[0]
        update, _ = balancer_update(balancers.ConFIG(), grads)
        assert_direction(update, x)
        update, _ = balancer_update(balancers.IMTLG(), grads)  # along x, up to IMTL-G's sign
        assert_direction(np.sign(update @ x) * update, x)


def test_two_gradients_match_the_official_double_form_and_scale():
    rng = np.random.default_rng(2)
    for _ in range(5):
        g = rng.normal(size=(2, 6))
        update, _ = balancer_update(balancers.ConFIG(), g)
        np.testing.assert_allclose(update, config_double_reference(*g), rtol=1e-4)
    g = np.array([[1.0, 2.0, 0.5]] * 3)  # equal gradients: ConFIG sums, IMTL-G averages
    np.testing.assert_allclose(balancer_update(balancers.ConFIG(), g)[0], 3 * g[0], rtol=1e-5)
    np.testing.assert_allclose(balancer_update(balancers.IMTLG(), g)[0], g[0], rtol=1e-5)


@pytest.mark.parametrize(
    "spec, kind",
    [
        ("imtl_g", balancers.IMTLG),
        ("IMTL-G", balancers.IMTLG),
        ("imtlg", balancers.IMTLG),
        ("config", balancers.ConFIG),
        ("ConFIG", balancers.ConFIG),
    ],
)
def test_parse(spec, kind):
    balancer = balancers.parse(spec)
    assert isinstance(balancer, kind)
    assert isinstance(balancers.parse(balancer.spec), kind)
    assert kind(layer="hidden").layer == "hidden"
    with pytest.raises(ValueError, match=r"takes at most 0 fields"):
        balancers.parse(f"{spec}:2")


@pytest.mark.parametrize("spec", ["imtl_g", "config"])
def test_in_the_trainer(spec):
    train_two_terms(spec)
