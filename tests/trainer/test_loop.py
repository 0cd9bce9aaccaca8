"""The outer loop: logged values are window means, fit returns a History, call sizes change
speed only, data in every form Keras takes, phases that run several times per step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, penalised_model, regression_data, weights_of

from termwise import losses
from termwise.trainer import History, Trainer


def sgd(lr=0.1):
    return keras.optimizers.SGD(lr)


def fixed_batches(n_batches=4, size=4, features=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches * size, features)).astype("float32")
    y = rng.normal(size=(n_batches * size, 1)).astype("float32")
    return x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(size)


def test_logged_values_are_means_over_the_steps_since_the_last_log():
    # With a learning rate of 0 every step sees the same model, so each batch's loss is known.
    x, y, data = fixed_batches()
    t = Trainer(
        linear_model(), sgd(0.0), loss=losses.mean_squared_error, log_every=2, progress=False
    )
    history = t.fit(data, steps=4)
    per_batch = ((x.sum(1, keepdims=True) - y) ** 2).reshape(4, 4).mean(1)
    assert history.steps["loss/loss"] == [2, 4]
    np.testing.assert_allclose(
        history.history["loss/loss"], [per_batch[:2].mean(), per_batch[2:].mean()], rtol=1e-6
    )
    assert isinstance(history, keras.callbacks.History) and isinstance(history, History)
    assert history.last["loss/loss"] == history.history["loss/loss"][-1]
    # Shares of the total: the one term is all of it.
    assert history.history["share/loss"] == [1.0, 1.0]


@pytest.mark.parametrize("calls", [1, 3, "auto"])
def test_call_size_changes_nothing_that_is_logged_or_learned(calls):
    x, y = regression_data(64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)

    def run(steps_per_execution):
        keras.utils.set_random_seed(1)
        t = Trainer(
            penalised_model(),
            keras.optimizers.Adam(1e-2),
            loss=losses.mean_squared_error,
            weights={"sparsity": "linear:0:1:10"},
            log_every=5,
            grad_log_every=4,
            steps_per_execution=steps_per_execution,
            progress=False,
        )
        history = t.fit(data, steps=13)
        return history, weights_of(t.model)

    (reference, ref_weights), (other, weights) = run(13), run(calls)
    for a, b in zip(ref_weights, weights, strict=True):
        np.testing.assert_array_equal(a, b)
    for key, values in reference.history.items():
        if not key.startswith("perf/"):
            assert np.array_equal(values, other.history[key]), key
            assert reference.steps[key] == other.steps[key], key
    assert reference.steps["grad_norm/loss"] == [4, 8, 12]
    assert reference.steps["loss/loss"] == [5, 10, 13]


def test_a_later_fit_starts_at_the_call_size_the_last_one_reached():
    # Each fit began again at calls of one step (1, 2, 4, ... to the next boundary), however
    # far the last fit's calls had grown.
    x, y, data = fixed_batches()
    t = Trainer(linear_model(), sgd(0.0), loss=losses.mean_squared_error, progress=False)
    counts = []
    run_call = t._run_call

    def recording(iterator, count, diagnostic, guard):
        counts.append(count)
        return run_call(iterator, count, diagnostic, guard)

    t._run_call = recording
    t.fit(data.repeat(), steps=15)
    assert counts == [1, 2, 4, 8]
    counts.clear()
    t.fit(data.repeat(), steps=40)
    assert counts == [16, 24]  # 16 steps (grown after the 8), then to the fit's end
    assert t.step == 55


def test_history_holds_every_logged_value_with_validation():
    x, y = regression_data(32)
    t = Trainer(
        penalised_model(),
        sgd(0.01),
        loss=losses.mean_squared_error,
        log_every=2,
        grad_log_every=3,
        progress=False,
    )
    history = t.fit((x, y), steps=4, batch_size=16, validation_data=(x, y))
    h = history.history
    assert history.steps["loss/sparsity"] == [2, 4]
    assert history.steps["eval/total"] == [2, 4]  # one pass is 2 steps
    assert history.steps["grad_norm/sparsity"] == [3]
    assert history.steps["grad_share/loss"] == [3]
    shares = [h[f"grad_share/{n}"][0] for n in ("loss", "sparsity", "regularization")]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    for name in ("weight/loss", "total/train", "optimizer/train/learning_rate"):
        assert len(h[name]) == 2, name


def test_a_py_dataset_trains_as_its_batches_do():
    x, y, data = fixed_batches()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return x[4 * index : 4 * index + 4], y[4 * index : 4 * index + 4]

    def run(source):
        keras.utils.set_random_seed(2)
        t = Trainer(linear_model(), sgd(0.05), loss=losses.mean_squared_error, progress=False)
        t.fit(source, epochs=2)
        return t.step, weights_of(t.model)

    (step, expected), (py_step, got) = run(data), run(Batches())
    assert step == py_step == 8
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_generator_is_read_once_and_its_end_ends_fit(tmp_path, caplog):
    x, y, _ = fixed_batches()

    def batches():
        for i in range(3):
            yield x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]

    t = Trainer(
        linear_model(),
        sgd(0.05),
        loss=losses.mean_squared_error,
        checkpoint_dir=str(tmp_path),
        progress=False,
    )
    with caplog.at_level("WARNING"):
        t.fit(batches(), steps=5)
    assert t.step == 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot hold its position" in messages and "ran out at step 3" in messages
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-3")


def test_an_empty_dataset_is_an_error_before_training():
    x, y = regression_data(3)
    empty = tf.data.Dataset.from_tensor_slices((x, y)).batch(4, drop_remainder=True)
    t = Trainer(linear_model(4), sgd(), loss=losses.mean_squared_error, progress=False)
    with pytest.raises(ValueError, match="holds no batch"):
        t.fit(empty, steps=2)
    assert t.step == 0


def test_a_phase_that_names_no_model_is_an_error():
    class TwoModels(Trainer):
        def compute_terms(self, batch, training, phase):
            x, y = batch
            model = self.model["generator"] if phase == "generator" else self.model["critic"]
            return {f"{phase}_loss": losses.mean_squared_error(y, model(x))}

    models = {"generator": linear_model(name="g"), "critic": linear_model(name="c")}
    optimizers = {"discriminator": sgd(), "generator": sgd()}
    with pytest.raises(ValueError, match=r"Phase 'discriminator' names no model.*'critic'"):
        TwoModels(models, optimizers, progress=False).fit(regression_data(8, 2), steps=1)


class NaNAt(keras.layers.Layer):
    """Passes its input through, NaN at one global call count (a term that blows up once)."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.calls.assign_add(1.0)
        bad = tf.logical_and(tf.cast(training or False, tf.bool), tf.equal(self.calls, self.at))
        return tf.where(bad, tf.fill(tf.shape(x), np.nan), x)


def test_a_fit_after_a_non_finite_term_continues():
    from termwise.trainer import NonFiniteLossError

    inputs = keras.Input((2,))
    model = keras.Model(inputs, NaNAt(2.0)(keras.layers.Dense(1)(inputs)))
    x, y = regression_data(8, 2)
    t = Trainer(
        model, sgd(0.01), loss=losses.mean_squared_error, steps_per_execution=1, progress=False
    )
    with pytest.raises(NonFiniteLossError, match=r"Loss term 'loss'.*at step 2"):
        t.fit((x, y), steps=4, batch_size=8)
    assert t.step == 1
    t.fit((x, y), steps=2, batch_size=8)  # the NaN was a one-off: training goes on
    assert t.step == 3


def test_a_nan_schedule_is_blamed_on_the_weight():
    from termwise.trainer import NonFiniteLossError

    x, y = regression_data(8, 2)
    nan_at_one = lambda step: tf.where(step >= 1, np.nan, 1.0)  # noqa: E731
    t = Trainer(
        linear_model(),
        sgd(),
        loss=losses.mean_squared_error,
        weights={"loss": nan_at_one},
        progress=False,
    )
    with pytest.raises(NonFiniteLossError, match=r"The weight of term 'loss'.*at step 2"):
        t.fit((x, y), steps=3, batch_size=8)


def test_trace_time_errors_read_as_one_line():
    class Bad(Trainer):
        def compute_terms(self, batch, training):
            x, y = batch
            if training:
                raise ValueError("term 'a' has shape [3]; want [batch]")
            return {"a": losses.mean_squared_error(y, self.model(x))}

    x, y = regression_data(8, 2)
    with pytest.raises(ValueError) as caught:
        Bad(linear_model(), sgd(), progress=False).fit((x, y), steps=1)
    assert str(caught.value).splitlines()[0] == "term 'a' has shape [3]; want [batch]"


def test_build_and_evaluate_leave_the_random_state_alone():
    # A noise layer draws from its SeedGenerator in every call: build, evaluate and validation
    # must not advance it, or a run with them would differ from one without.
    def run(extra):
        keras.utils.set_random_seed(4)
        inputs = keras.Input((4,))
        h = keras.layers.GaussianNoise(0.3, seed=3)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(1)(h))
        t = Trainer(model, sgd(0.05), loss=losses.mean_squared_error, progress=False)
        x, y = regression_data(32)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        if extra:
            t.build(data)
            t.evaluate(data)
            t.fit(data, steps=6, validation_data=data, validation_every=2)
        else:
            t.fit(data, steps=6)
        return weights_of(t.model)

    for a, b in zip(run(False), run(True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stateful_random_ops_are_warned_about(caplog):
    class Noisy(Trainer):
        def compute_terms(self, batch, training):
            x, y = batch
            noisy = x + 0.1 * tf.random.normal(tf.shape(x))
            return {"mse": losses.mean_squared_error(y, self.model(noisy))}

    class Seeded(Trainer):
        def compute_terms(self, batch, training):
            x, y = batch
            noise = keras.random.normal(tf.shape(x), stddev=0.1, seed=self.seed_generator)
            return {"mse": losses.mean_squared_error(y, self.model(x + noise))}

    data = regression_data(8, 2)
    with caplog.at_level("WARNING"):
        Seeded(linear_model(), sgd(), progress=False).fit(data, steps=1)
    assert "stateful" not in caplog.text
    with caplog.at_level("WARNING"):
        Noisy(linear_model(), sgd(), progress=False).fit(data, steps=1)
    assert "stateful ops (RandomStandardNormal" in caplog.text
    assert "seed=self.seed_generator" in caplog.text


# ----------------------------------------------------------------------------------------------
# Several runs of a phase per step: WGAN-GP's critic, against a hand-written TensorFlow loop.


def _wgan_models():
    keras.utils.set_random_seed(5)
    critic = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(8, "tanh"), keras.layers.Dense(1)]
    )
    generator = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return critic, generator


def _gradient_penalty(critic, real, fake, eps):
    mixed = eps * real + (1.0 - eps) * fake
    with tf.GradientTape() as tape:
        tape.watch(mixed)
        scores = critic(mixed)
    grads = tape.gradient(scores, mixed)
    return (tf.norm(grads, axis=1) - 1.0) ** 2


class WGANTrainer(Trainer):
    """The keras.io WGAN-GP recipe: critic 3 runs per step, then the generator once."""

    def compute_terms(self, batch, training, phase):
        real, latents, eps = batch
        critic, generator = self.model["critic"], self.model["generator"]
        fake = generator(latents, training=training)
        if phase == "critic":
            fake = tf.stop_gradient(fake)
            return {
                "critic_wasserstein": critic(fake)[:, 0] - critic(real)[:, 0],
                "gradient_penalty": 10.0 * _gradient_penalty(critic, real, fake, eps),
            }
        return {"generator_wasserstein": -critic(fake)[:, 0]}


def test_phase_steps_match_a_hand_written_wgan_gp_loop():
    rng = np.random.default_rng(0)
    n, size, steps, runs = 48, 4, 3, 3
    real = rng.normal(size=(n, 2)).astype("float32")
    latents = rng.normal(size=(n, 3)).astype("float32")
    eps = rng.uniform(size=(n, 1)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((real, latents, eps)).batch(size)

    critic, generator = _wgan_models()
    c_opt, g_opt = keras.optimizers.Adam(1e-2, beta_1=0.5), keras.optimizers.Adam(1e-2, beta_1=0.5)
    batches = list(data.as_numpy_iterator())
    for step in range(steps):
        step_batches = batches[step * runs : (step + 1) * runs]
        for b_real, b_latents, b_eps in step_batches:  # run r of the critic on batch r
            with tf.GradientTape() as tape:
                fake = generator(b_latents)
                loss = tf.reduce_mean(critic(fake)[:, 0] - critic(b_real)[:, 0]) + tf.reduce_mean(
                    10.0 * _gradient_penalty(critic, b_real, fake, b_eps)
                )
            c_opt.apply(tape.gradient(loss, critic.trainable_variables), critic.trainable_variables)
        _, b_latents, _ = step_batches[0]  # the generator runs once, on the step's first batch
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(-critic(generator(b_latents))[:, 0])
        g_opt.apply(
            tape.gradient(loss, generator.trainable_variables), generator.trainable_variables
        )
    expected = weights_of(critic) + weights_of(generator)

    critic, generator = _wgan_models()
    t = WGANTrainer(
        {"critic": critic, "generator": generator},
        {
            "critic": keras.optimizers.Adam(1e-2, beta_1=0.5),
            "generator": keras.optimizers.Adam(1e-2, beta_1=0.5),
        },
        phase_steps={"critic": runs},
        grad_log_every=0,
        progress=False,
    )
    t.fit(data, steps=steps)
    for a, b in zip(expected, weights_of(critic) + weights_of(generator), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(t.phases["critic"].optimizer.iterations) == runs * steps
    assert int(t.phases["generator"].optimizer.iterations) == steps
    assert t.step == steps


def test_phase_steps_are_checked():
    models = {"critic": linear_model(name="c"), "generator": linear_model(name="g")}
    opts = {"critic": sgd(), "generator": sgd()}
    with pytest.raises(ValueError, match=r"`phase_steps` names phases that do not exist: \['d'\]"):
        WGANTrainer(models, opts, phase_steps={"d": 2})
    with pytest.raises(ValueError, match=r"`phase_steps\['critic'\]` \(0\) must be a positive"):
        WGANTrainer(models, opts, phase_steps={"critic": 0})


def test_the_call_thread_runs_the_meanwhile_work_beside_the_call_and_raises_after_it():
    # The fit's first call runs on the call thread while the main thread traces the diagnostic
    # function: both must run at once, and the call's own error comes first.
    import threading

    from termwise.trainer.preemption import CallThread

    calls = CallThread()
    started, finish = threading.Event(), threading.Event()
    seen = []

    def job():
        started.set()
        assert finish.wait(10)
        return "done"

    def meanwhile():
        assert started.wait(10)  # the job is running: this runs beside it
        seen.append(threading.current_thread() is threading.main_thread())
        finish.set()

    assert calls(job, meanwhile=meanwhile) == "done" and seen == [True]

    def failing():
        raise ValueError("trace")

    with pytest.raises(ValueError, match="trace"):
        calls(lambda: "done", meanwhile=failing)
    with pytest.raises(KeyError, match="call"):  # the call's error before the trace's
        calls(lambda: {}["call"], meanwhile=failing)
    assert calls(lambda: "again") == "again"  # the thread still serves calls
