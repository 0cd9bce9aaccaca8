"""The in-graph solvers against brute force: every active set enumerated, KKT conditions checked.

Also the gradient cases every Gramian balancer's tests share (`gradient_cases`), the float64
references of the problems (`brute_min_norm`, `brute_cone_projection`) and `assert_direction`.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, weights_of

from termwise.trainer import Trainer, balancers
from termwise.trainer.balancers import solvers


def gradient_cases(seed=0):
    """(name, [T, n] float64 gradients): the cases every Gramian balancer is checked on."""
    rng = np.random.default_rng(seed)
    cases = [(f"random{t}", rng.normal(size=(t, 7))) for t in (2, 3, 4, 5)]
    a, b = rng.normal(size=7), rng.normal(size=7)
    b -= (a @ b) / (a @ a) * a
    # Every pair conflicts (cosines -0.4), norms 1, 2 and 0.5, in a random 3-D subspace.
    cosines = np.full((3, 3), -0.4) + 1.4 * np.eye(3)
    basis = np.linalg.qr(rng.normal(size=(7, 3)))[0]
    conflicting = np.linalg.cholesky(cosines) @ basis.T * np.array([[1.0], [2.0], [0.5]])
    cases.append(("conflicting", conflicting))
    # In one plane, at 0, 100 and 130 degrees: rank 2.
    angles = np.radians([0.0, 100.0, 130.0])
    cases.append(("planar", np.stack([np.cos(t) * a + np.sin(t) * b for t in angles])))
    cases.append(("parallel", a + 1e-2 * rng.normal(size=(3, 7))))
    cases.append(("opposite", np.stack([a, -a + 3e-2 * rng.normal(size=7), b])))
    g = rng.normal(size=(4, 7))
    g[2] = g[0]
    cases.append(("duplicate", g))
    g = rng.normal(size=(3, 7))
    g[1] = 0.0
    cases.append(("zero", g))
    g = rng.normal(size=(3, 7))
    g[2] *= 1e-6
    cases.append(("tiny", g))
    g = rng.normal(size=(3, 7))
    g[1] = -1e-6 * g[0] + 1e-6 * rng.normal(size=7)  # tiny and conflicting
    cases.append(("tiny_conflicting", g))
    cases.append(("one", rng.normal(size=(1, 7))))
    cases.append(("all_zero", np.zeros((3, 7))))
    cases.append(("wide", rng.normal(size=(5, 3))))  # more terms than dimensions
    return cases


CASES = gradient_cases()
CASE_IDS = [name for name, _ in CASES]


def assert_direction(actual, expected, tol=1e-4, scale=None):
    """Same direction to `tol` (unit vectors), or both zero relative to `scale`."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.linalg.norm(expected), 1e-300) if scale is None else scale
    if np.linalg.norm(expected) <= 1e-9 * scale:
        assert np.linalg.norm(actual) <= 1e-5 * scale, (actual, expected)
        return
    a = actual / np.linalg.norm(actual)
    e = expected / np.linalg.norm(expected)
    assert np.linalg.norm(a - e) <= tol, (np.linalg.norm(a - e), actual, expected)


def assert_close(actual, expected, tol=1e-4, scale=None):
    """``|actual - expected| <= tol |expected|`` (in norm), or both zero relative to `scale`."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    size = np.linalg.norm(expected)
    floor = 1e-6 * (size if scale is None else scale)
    assert np.linalg.norm(actual - expected) <= tol * size + floor, (actual, expected)


def brute_nnls(m, q):
    """min_{s >= 0} s'Ms - 2q's by enumerating every passive set: the best KKT point."""
    count = len(q)
    best = (np.inf, None)
    for k in range(count + 1):
        for passive in itertools.combinations(range(count), k):
            passive = list(passive)
            s = np.zeros(count)
            if passive:
                s[passive] = np.linalg.lstsq(m[np.ix_(passive, passive)], q[passive], rcond=None)[0]
            if s.min() < 0:
                continue
            value = s @ m @ s - 2 * q @ s
            if value < best[0] - 1e-12 * max(1.0, abs(value)):
                best = (value, s)
    return best


def brute_min_norm(gram):
    """min_{w in simplex} w'Gw, by enumerating the faces (the KKT system of each)."""
    count = len(gram)
    best = (np.inf, None)
    for k in range(1, count + 1):
        for face in itertools.combinations(range(count), k):
            face = list(face)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = gram[np.ix_(face, face)]
            kkt[:k, k] = kkt[k, :k] = 1.0
            rhs = np.zeros(k + 1)
            rhs[k] = 1.0
            solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
            w = np.zeros(count)
            w[face] = solution[:k]
            if w.min() < -1e-12 or abs(w.sum() - 1.0) > 1e-9:
                continue
            value = w @ gram @ w
            if value < best[0] - 1e-14 * max(1.0, value):
                best = (value, w)
    return best


def brute_cone_projection(grads, u):
    """min_{v >= u} |v'J|^2 by enumerating which constraints are active (v_i = u_i)."""
    gram = grads @ grads.T
    count = len(u)
    best = (np.inf, None)
    for k in range(count + 1):
        for free in itertools.combinations(range(count), k):
            free = list(free)
            fixed = [i for i in range(count) if i not in free]
            v = np.array(u, np.float64)
            if free:  # minimise over the free entries, the others at u: least squares in J
                target = -(v[fixed] @ grads[fixed]) if fixed else np.zeros(grads.shape[1])
                v[free] = np.linalg.lstsq(grads[free].T, target, rcond=None)[0]
            if np.min(v - u) < -1e-12 * max(1.0, np.abs(v).max()):
                continue
            value = v @ gram @ v
            if value < best[0] - 1e-12 * max(value, 1e-300):
                best = (value, v)
    return best


def assert_cone_kkt(grads, u, v, tol=1e-6):
    """v >= u, G v >= 0 and (G v)_i (v_i - u_i) = 0, scaled per gradient."""
    norms = np.linalg.norm(grads, axis=1)
    update = v @ grads
    size = max(np.linalg.norm(u @ grads), np.linalg.norm(update), 1e-300)
    inner = grads @ update / np.where(norms > 0, norms, 1.0) / size  # g_i-hat . update / size
    assert np.all(v - u >= -1e-9 * np.maximum(1.0, np.abs(v)))
    assert np.all(inner >= -tol), inner
    slack = (v - u) * np.where(norms > 0, norms, 0.0)  # in units of each gradient
    assert np.all(np.abs(inner * slack) <= tol * np.maximum(1.0, np.abs(slack))), (inner, slack)


def random_psd(rng, count, rank):
    factor = rng.normal(size=(count, rank))
    return factor @ factor.T


@pytest.mark.parametrize("count, rank", [(1, 1), (3, 3), (5, 5), (5, 2), (6, 6), (6, 3)])
def test_nnls_matches_brute_force(count, rank):
    rng = np.random.default_rng(count * 10 + rank)
    for _ in range(10):
        m = random_psd(rng, count, rank)
        q = rng.normal(size=count)
        if rank < count:  # q in the range of M, so that the problem is bounded
            q = m @ rng.normal(size=count)
        s, passive, converged = solvers.nonnegative_least_squares(
            tf.constant(m), tf.constant(q[None, :])
        )
        s, passive = s.numpy()[0], passive.numpy()[0]
        assert converged.numpy()[0]
        value, expected = brute_nnls(m, q)
        assert s @ m @ s - 2 * q @ s == pytest.approx(value, rel=1e-9, abs=1e-9)
        assert s.min() >= 0.0 and np.all(s[~passive] == 0.0)
        w = q - m @ s  # KKT: w <= 0 off the passive set, w = 0 on it
        scale = np.abs(q).max() + np.abs(m).max() * np.abs(s).max()
        assert np.all(w <= 1e-9 * scale) and np.all(np.abs(w[passive]) <= 1e-9 * scale)
        if rank == count:  # strictly convex: the solution itself is unique
            np.testing.assert_allclose(s, expected, rtol=1e-7, atol=1e-9)


def test_nnls_is_batched_and_honours_exclusions():
    rng = np.random.default_rng(7)
    m = random_psd(rng, 4, 4)
    q = rng.normal(size=(3, 4)) + 1.0
    s, _, converged = solvers.nonnegative_least_squares(tf.constant(m), tf.constant(q))
    assert np.all(converged.numpy())
    for row in range(3):
        np.testing.assert_allclose(s.numpy()[row], brute_nnls(m, q[row])[1], atol=1e-9)
    excluded = np.array([True, False, False, True])
    s, _, _ = solvers.nonnegative_least_squares(
        tf.constant(m), tf.constant(q[:1]), excluded=tf.constant(excluded)
    )
    keep = [1, 2]
    expected = np.zeros(4)
    expected[keep] = brute_nnls(m[np.ix_(keep, keep)], q[0, keep])[1]
    np.testing.assert_allclose(s.numpy()[0], expected, atol=1e-9)


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_min_norm_point_matches_the_faces(name, grads):
    gram = grads @ grads.T
    w = solvers.min_norm_point(tf.constant(gram)).numpy()
    assert w.min() >= 0.0 and w.sum() == pytest.approx(1.0)
    if name == "all_zero":
        np.testing.assert_allclose(w, 1.0 / len(w))
        return
    value, expected = brute_min_norm(gram)
    scale = np.max(np.diag(gram))
    assert w @ gram @ w == pytest.approx(value, rel=1e-7, abs=1e-13 * scale)
    # Optimality: (G w)_i >= w'Gw for every i.
    assert np.all(gram @ w >= w @ gram @ w - 1e-9 * scale)
    assert_direction(w @ grads, expected @ grads, scale=np.sqrt(scale))


@pytest.mark.parametrize("name, grads", CASES, ids=CASE_IDS)
def test_dual_cone_projection_matches_brute_force(name, grads):
    gram = grads @ grads.T
    count = len(grads)
    rows = np.concatenate([np.eye(count) / count, np.full((1, count), 1.0 / count)])
    v = solvers.dual_cone_projection(tf.constant(gram), tf.constant(rows)).numpy()
    assert np.all(np.isfinite(v))
    for u, projection in zip(rows, v, strict=True):
        if name == "all_zero":
            np.testing.assert_array_equal(projection, u)
            continue
        assert_cone_kkt(grads, u, projection)
        # The cone does not change when a gradient is rescaled: brute force on unit gradients.
        norms = np.linalg.norm(grads, axis=1)
        nonzero = norms > 0
        units = grads[nonzero] / norms[nonzero, None]
        _, expected = brute_cone_projection(units, u[nonzero] * norms[nonzero])
        scale = np.linalg.norm(u @ grads)
        assert_direction(projection @ grads, expected @ units, scale=scale)
        np.testing.assert_array_equal(projection[~nonzero], u[~nonzero])


def test_dual_cone_projection_is_scale_free_for_one_gradient():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(4, 6))
    u = np.full(4, 0.25)
    v = solvers.dual_cone_projection(tf.constant(grads @ grads.T), tf.constant(u)).numpy()
    scaled = grads * np.array([1.0, 1e-6, 1.0, 1.0])[:, None]
    w = solvers.dual_cone_projection(tf.constant(scaled @ scaled.T), tf.constant(u)).numpy()
    # The same cone; the projected point moves only by u_1 g_1's change.
    assert_cone_kkt(scaled, u, w)
    _, expected = brute_cone_projection(scaled, u)
    assert_direction(w @ scaled, expected @ scaled)
    assert not np.allclose(v, w)


def test_sixteen_terms_converge_and_satisfy_kkt():
    rng = np.random.default_rng(16)
    grads = rng.normal(size=(16, 12))  # more terms than dimensions: a singular Gramian
    grads[3] = grads[5]
    gram = grads @ grads.T
    count = len(grads)
    s, _, converged = solvers.nonnegative_least_squares(
        tf.constant(gram / np.diag(gram).max() + 1.0), tf.ones([1, count], tf.float64)
    )
    assert converged.numpy().all()
    w = solvers.min_norm_point(tf.constant(gram)).numpy()
    assert np.all(gram @ w >= w @ gram @ w - 1e-9 * np.diag(gram).max())
    v = solvers.dual_cone_projection(tf.constant(gram), tf.eye(count, dtype=tf.float64)).numpy()
    for u, projection in zip(np.eye(count), v, strict=True):
        assert_cone_kkt(grads, u, projection)


def test_pseudo_solve_and_unit_gramian():
    rng = np.random.default_rng(1)
    m = random_psd(rng, 5, 3)
    rhs = rng.normal(size=5)
    x = solvers.pseudo_solve(tf.constant(m), tf.constant(rhs)).numpy()
    np.testing.assert_allclose(x, np.linalg.pinv(m) @ rhs, rtol=1e-7, atol=1e-9)
    kkt = np.array([[2.0, 1.0], [1.0, 0.0]])  # indefinite
    x = solvers.pseudo_solve(tf.constant(kkt), tf.constant([1.0, 1.0], tf.float64), psd=False)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(kkt, [1.0, 1.0]))
    grads = rng.normal(size=(3, 4)) * np.array([[2.0], [0.0], [1e-6]])
    unit, norms = solvers.unit_gramian(tf.constant(grads @ grads.T))
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(grads, axis=1), rtol=1e-12)
    units = grads[[0, 2]] / np.linalg.norm(grads[[0, 2]], axis=1, keepdims=True)
    np.testing.assert_allclose(unit.numpy()[np.ix_([0, 2], [0, 2])], units @ units.T, atol=1e-12)
    np.testing.assert_array_equal(unit.numpy()[1], 0.0)


def test_non_finite_gramians_give_nan_and_never_reach_eigh():
    gram = tf.constant([[1.0, np.nan], [np.nan, 1.0]], tf.float32)
    clean, finite = solvers.float64_gramian(gram)
    assert not finite.numpy() and np.all(clean.numpy() == 0.0)
    w = solvers.finite_or_nan(solvers.min_norm_point(clean), finite)
    assert w.dtype == tf.float32 and np.all(np.isnan(w.numpy()))
    v = solvers.dual_cone_projection(clean, tf.constant([0.5, 0.5], tf.float64))
    assert np.all(np.isfinite(v.numpy()))


def test_deterministic_and_compiled():
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(5, 6))
    gram = tf.constant(grads @ grads.T, tf.float32)

    def both(gram):
        gram, _ = solvers.float64_gramian(gram)
        return solvers.min_norm_point(gram), solvers.dual_cone_projection(
            gram, tf.eye(5, dtype=tf.float64) / 5.0
        )

    def cone(gram):  # the NNLS loop under XLA (`Trainer(jit_compile=True)`)
        return solvers.dual_cone_projection(
            solvers.float64_gramian(gram)[0], tf.fill([5], tf.constant(0.2, tf.float64))
        )

    eager = [x.numpy() for x in both(gram)]
    graph = [x.numpy() for x in tf.function(both)(gram)]
    again = [x.numpy() for x in tf.function(both)(gram)]
    for a, b, c in zip(eager, graph, again, strict=True):
        np.testing.assert_array_equal(b, c)  # bit for bit, run to run
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    xla = tf.function(cone, jit_compile=True)(gram).numpy()
    np.testing.assert_allclose(xla, cone(gram).numpy(), rtol=1e-9, atol=1e-12)


def balancer_update(balancer, grads, step=0):
    """The update a Gramian balancer makes of the rows of `grads`, from a float32 Gramian."""
    grads = np.asarray(grads, np.float64)
    if not balancer.built:
        balancer.build([f"term{i}" for i in range(len(grads))])
    weighting = balancer.weights(
        tf.ones([len(grads)]), tf.constant(step, tf.int64), tf.constant(grads @ grads.T, tf.float32)
    )
    weights = weighting.weights.numpy().astype(np.float64)
    if weighting.mixing is not None:
        weights = weighting.mixing.numpy().astype(np.float64).sum(axis=0) * weights
    return weights @ grads, weighting


def train_two_terms(spec, steps=3):
    """A few steps of `Trainer(balancer=spec)` on y = w.x + b with two conflicting terms.

    Returns the logs, and the first step's update against the balancer's own update of the
    terms' hand-computed gradients (a fresh balancer from the same string).
    """
    x = np.array([[1.0, 2.0], [0.5, -1.0], [-1.0, 0.5]], "float32")
    y = np.array([3.0, -2.0, 1.0], "float32")

    class TwoTerms(Trainer):
        def compute_terms(self, batch, training):
            x, y = batch
            pred = self.model(x, training=training)[:, 0]
            return {"fit": tf.reduce_mean(tf.square(pred - y)), "shrink": 4.0 * tf.square(pred)}

    model = linear_model()
    learning_rate = 0.05
    t = TwoTerms(model, keras.optimizers.SGD(learning_rate), balancer=spec, progress=False)
    before = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    logs = t.fit(tf.data.Dataset.from_tensors((x, y)), steps=1).last
    after = np.concatenate([w.reshape(-1) for w in weights_of(model)])
    features = np.concatenate([x, np.ones((3, 1))], axis=1).astype(np.float64)
    pred = features @ before
    grads = np.stack(
        [
            2.0 * (pred - y) @ features / 3.0,  # d fit / d [w1, w2, b]
            4.0 * 2.0 * pred @ features / 3.0,  # d shrink (the mean over examples)
        ]
    )
    expected, _ = balancer_update(balancers.parse(spec), grads)
    np.testing.assert_allclose(before - after, learning_rate * expected, rtol=1e-4, atol=1e-6)
    more = t.fit(tf.data.Dataset.from_tensors((x, y)), steps=steps - 1).last
    for key in ("weight/fit", "weight/shrink", "total/train"):
        assert np.isfinite(logs[key]) and np.isfinite(more[key]), (key, logs, more)
    assert np.all(np.isfinite(np.concatenate([w.reshape(-1) for w in weights_of(model)])))
    return logs, more
