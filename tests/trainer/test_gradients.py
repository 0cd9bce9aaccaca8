"""Per-term gradients: the Gramian's statistics, the diagnostic step and its TensorBoard tags."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, penalised_model, regression_data, weights_of

from termwise import losses
from termwise.trainer import Trainer, balancers, gradients
from termwise.trainer.summaries import read_events


def numpy_statistics(grads, weights=None, update=None):
    """Norms, cosines to the total, pairwise cosines and conflict, straight from the vectors."""
    grads = np.asarray(grads, np.float64)
    w = np.ones(len(grads)) if weights is None else np.asarray(weights, np.float64)
    u = w if update is None else np.asarray(update, np.float64)
    weighted = grads * w[:, None]
    total = u @ grads
    norms = np.linalg.norm(weighted, axis=1)
    cosines = weighted @ total / (norms * np.linalg.norm(total))
    matrix = (weighted @ weighted.T) / np.outer(norms, norms)
    pairs = [(i, j) for i in range(len(grads)) for j in range(i + 1, len(grads))]
    conflict = np.mean([matrix[i, j] < 0 for i, j in pairs])
    return norms, cosines, matrix, conflict


def as_stacks(vectors, sizes):
    """Splits [T, P] vectors into per-variable [T, n_v] stacks, as the engine sees them."""
    splits = np.cumsum(sizes)[:-1]
    return [tf.constant(part, tf.float32) for part in np.split(vectors, splits, axis=1)]


@pytest.mark.parametrize("with_weights", [False, True])
def test_statistics_match_numpy(with_weights):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 9)).astype("float32")
    vectors[3] = -vectors[0] + 0.1 * vectors[3]  # one clear conflict
    stacks = as_stacks(vectors, [2, 3, 4])
    gram = gradients.gramian(stacks)
    np.testing.assert_allclose(gram.numpy(), vectors @ vectors.T, rtol=1e-5, atol=1e-5)
    weights = update = None
    if with_weights:
        weights, update = np.array([0.5, 2.0, 1.0, 3.0]), np.array([1.0, -0.5, 0.2, 0.7])
    stats = gradients.statistics(gram, weights, update)
    norms, cosines, matrix, conflict = numpy_statistics(vectors, weights, update)
    np.testing.assert_allclose(stats["norms"].numpy(), norms, rtol=1e-5)
    np.testing.assert_allclose(stats["cosines"].numpy(), cosines, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["cosine_matrix"].numpy(), matrix, rtol=1e-4, atol=1e-5)
    assert float(stats["conflict"]) == pytest.approx(conflict)


def test_subset_gramian_and_combination():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 6)).astype("float32")
    stacks = as_stacks(vectors, [2, 4])
    part = vectors[:, 2:]
    np.testing.assert_allclose(gradients.gramian(stacks, [1]).numpy(), part @ part.T, rtol=1e-5)
    variables = [tf.Variable(tf.zeros([2])), tf.Variable(tf.zeros([2, 2]))]
    c = np.array([1.0, -2.0, 0.5], "float32")
    combined = gradients.combine(stacks, tf.constant(c), variables)
    np.testing.assert_allclose(combined[0].numpy(), c @ vectors[:, :2], rtol=1e-5)
    np.testing.assert_allclose(combined[1].numpy(), (c @ vectors[:, 2:]).reshape(2, 2), rtol=1e-5)


def test_one_term_has_no_conflict_and_zero_gradient_has_zero_cosine():
    stats = gradients.statistics(tf.constant([[4.0]]))
    assert float(stats["norms"][0]) == pytest.approx(2.0)
    assert float(stats["cosines"][0]) == pytest.approx(1.0)
    assert float(stats["conflict"]) == 0.0
    stats = gradients.statistics(tf.constant([[1.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(stats["cosines"].numpy(), [1.0, 0.0])


def test_dominance_monitor_warns_once_per_pair_after_patience():
    monitor = gradients.DominanceMonitor(ratio=100, patience=3)
    norms = {"loss": 500.0, "kl": 2.0, "l2": 1.0}
    weights = {"loss": 1.0, "kl": 0.5, "l2": 1.0}
    assert monitor.update("train", norms, weights, step=100) == []
    assert monitor.update("train", {**norms, "loss": 150.0}, weights, step=200) == []  # < 100x kl
    # loss / l2 = 500 on three steps in a row (150 at step 200 is still > 100x l2's 1.0).
    (message,) = monitor.update("train", norms, weights, step=300)
    assert "'loss' dominates 'l2'" in message
    assert monitor.update("train", norms, weights, step=400) == []
    # loss / kl: 75x at step 200 broke the streak; 250x at 300, 400 and now 500.
    messages = monitor.update("train", norms, weights, step=500)
    (message,) = messages
    # ratio 250; balancing weight for kl: 0.5 * 250 = 125, or for loss: 1 / 250 = 0.004.
    assert "'loss' dominates 'kl'" in message and "250x" in message
    assert "125 on 'kl'" in message and "0.004 on 'loss'" in message
    assert monitor.warned == {("loss", "kl"), ("loss", "l2")}
    assert monitor.update("train", norms, weights, step=600) == []


def independent_gradients(model, x, y, weights):
    """Each weighted term's gradient of the penalised model, computed without the Trainer."""
    hidden = model.get_layer("hidden")
    variables = model.trainable_variables
    grads = []
    for name in ("loss", "sparsity", "regularization"):
        with tf.GradientTape() as tape:
            h = hidden(x)
            pred = model.get_layer("out")(h)
            if name == "loss":
                value = tf.reduce_mean(tf.square(pred - y))
            elif name == "sparsity":
                value = 0.01 * tf.reduce_mean(tf.reduce_sum(tf.square(h), axis=-1))
            else:
                value = 1e-3 * tf.reduce_sum(tf.square(hidden.kernel))
            value = weights.get(name, 1.0) * value
        g = tape.gradient(value, variables)
        grads.append(
            np.concatenate(
                [
                    np.zeros(v.shape).ravel() if gi is None else gi.numpy().ravel()
                    for gi, v in zip(g, variables, strict=True)
                ]
            )
        )
    return np.stack(grads)


def test_diagnostic_step_matches_independent_gradients_and_plain_update():
    x, y = regression_data(64)
    weights = {"sparsity": 0.5}

    def make(grad_log_every):
        keras.utils.set_random_seed(4)
        return Trainer(
            penalised_model(),
            keras.optimizers.SGD(0.1),
            loss=losses.mean_squared_error,
            weights=weights,
            grad_log_every=grad_log_every,
            progress=False,
        )

    diagnosed, plain = make(1), make(0)
    expected = independent_gradients(diagnosed.model, x, y, weights)
    logs = diagnosed.fit((x, y), steps=1, batch_size=64).last
    plain_logs = plain.fit((x, y), steps=1, batch_size=64).last
    assert not any(k.startswith("grad_") for k in plain_logs)
    norms, cosines, _, conflict = numpy_statistics(expected)
    for i, name in enumerate(("loss", "sparsity", "regularization")):
        assert logs[f"grad_norm/{name}"] == pytest.approx(norms[i], rel=1e-4), name
        assert logs[f"grad_cosine/{name}"] == pytest.approx(cosines[i], rel=1e-3, abs=1e-5), name
    assert logs["grad_conflict/train"] == pytest.approx(conflict)
    # The update is the sum of the per-term gradients: the same as one backward pass.
    for a, b in zip(weights_of(diagnosed.model), weights_of(plain.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_tags_heatmap_and_dominance_warning(tmp_path, caplog):
    x, y = regression_data(64)
    t = Trainer(
        penalised_model(),
        keras.optimizers.SGD(0.01),
        loss=losses.mean_squared_error,
        log_dir=str(tmp_path),
        log_every=3,
        grad_log_every=2,
        steps_per_execution=4,
        progress=False,
    )
    with caplog.at_level(logging.WARNING):
        t.fit((x, y), steps=6, batch_size=16)
    events = read_events(tmp_path)
    tags = set(events.Tags()["tensors"])
    for term in ("loss", "sparsity", "regularization"):
        steps = [e.step for e in events.Tensors(f"grad_norm/{term}")]
        assert steps == [2, 4, 6], term
        assert [e.step for e in events.Tensors(f"grad_cosine/{term}")] == [2, 4, 6]
    assert [e.step for e in events.Tensors("grad_conflict/train")] == [2, 4, 6]
    assert [e.step for e in events.Tensors("loss/loss")] == [3, 6]
    assert "images/grad_cosine/train" in tags
    image = events.Tensors("images/grad_cosine/train")[-1]
    width, height = (int(v) for v in tf.make_ndarray(image.tensor_proto)[:2])
    assert width >= 300 and height >= 150  # a labelled heatmap, not 3 x 16 pixels a side
    # The MSE's gradient is thousands of times the regularizer's: one warning for that pair.
    warnings = [r.getMessage() for r in caplog.records if "dominates" in r.getMessage()]
    assert any("'loss' dominates 'regularization'" in m for m in warnings)
    assert len(warnings) == len(set(warnings))


def test_cosine_colour_scale():
    from termwise.trainer.summaries import _DIVERGING, _colour

    red, white, blue = (_colour(v, -1.0, 1.0, _DIVERGING) for v in (1.0, 0.0, -1.0))
    assert red[0] > 3 * max(red[1:])  # +1: (dark) red
    assert blue[2] > 2 * max(blue[:2])  # -1: (dark) blue
    assert min(white) > 230  # 0: white
    assert _colour(5.0, -1.0, 1.0, _DIVERGING) == red  # clipped to the scale


def test_diagnostics_with_two_phases_and_nonfinite_raise():
    x, y = regression_data(32, features=2)
    first, second = linear_model(name="a"), linear_model(name="b")

    class TwoPhase(Trainer):
        def compute_terms(self, batch, training, phase):
            x, y = batch
            pred = self.model[phase](x, training=training)
            terms = {f"mse_{phase}": losses.mean_squared_error(y, pred)}
            terms[f"size_{phase}"] = tf.reduce_mean(tf.square(pred), axis=-1)
            if phase == "second":
                bad = tf.cast(self._step, tf.float32) >= 2.0
                terms["size_second"] *= tf.where(bad, np.nan, 1.0)
            return terms

    t = TwoPhase(
        {"first": first, "second": second},
        {"first": keras.optimizers.SGD(0.01), "second": keras.optimizers.SGD(0.01)},
        balancer={"second": balancers.EMANormalize(0.5)},
        grad_log_every=1,
        progress=False,
    )
    logs = t.fit((x, y), steps=2, batch_size=32).last
    for name in ("mse_first", "size_first", "mse_second", "size_second"):
        assert logs[f"grad_norm/{name}"] > 0
    assert {"grad_conflict/first", "grad_conflict/second"} <= set(logs)
    state = t.balancers["second"].mean.numpy().copy()
    good = weights_of(second)
    from termwise.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="'size_second'"):
        t.fit((x, y), steps=2, batch_size=32)
    for a, b in zip(good, weights_of(second), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t.balancers["second"].mean.numpy(), state)


def test_balanced_diagnostic_steps_run_jitted():
    # PCGrad takes per-term gradients on every step; grad_log_every=1 makes each step a
    # diagnostic step too, so one traced function covers both under XLA.
    x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.5]], "float32")

    class UpDown(Trainer):
        def compute_terms(self, batch, training):
            pred = self.model(batch, training=training)[:, 0]
            return {"up": tf.square(pred - 2.0), "down": tf.square(pred + 1.0)}

    def train(jit_compile):
        t = UpDown(
            linear_model(),
            keras.optimizers.SGD(0.05),
            balancer=balancers.PCGrad(),
            grad_log_every=1,
            steps_per_execution=2,
            jit_compile=jit_compile,
            progress=False,
        )
        return t.fit(tf.data.Dataset.from_tensors(x), steps=4).last, weights_of(t.model)

    (logs, weights), (jit_logs, jit_weights) = train(False), train(True)
    for a, b in zip(weights, jit_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("grad_norm/up", "grad_cosine/down", "grad_conflict/train"):
        assert jit_logs[key] == pytest.approx(logs[key], rel=1e-4, abs=1e-6), key
