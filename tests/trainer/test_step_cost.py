"""What the step's speed work must keep: exact finiteness checks and autograph in user code."""

import collections
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import linear_model, regression_data, weights_of
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.eager import context

from termwise import losses
from termwise.trainer import NonFiniteLossError, Trainer
from termwise.trainer import gradients as gradients_lib


def sgd(lr=0.01):
    return keras.optimizers.SGD(lr)


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for dtype in ("float16", "float32", "float64"):
        for bad in (None, np.nan, np.inf, -np.inf):
            arrays = [rng.normal(size=s).astype(dtype) for s in ((3, 4), (5,), (2, 2, 2))]
            if bad is not None:
                arrays[1][3] = bad
            cases.append(arrays)
    huge = np.full((1000,), np.finfo("float32").max / 2, "float32")  # finite; its sum is not
    cases.append([huge, -huge[:10]])
    cases.append([np.zeros((0,), "float32"), np.ones((2,), "float32")])
    return cases


@pytest.mark.parametrize("arrays", _cases())
def test_all_finite_matches_numpy_eagerly_and_in_a_graph(arrays):
    expected = all(np.isfinite(a).all() for a in arrays)
    tensors = [tf.constant(a) for a in arrays]
    assert bool(gradients_lib.all_finite(tensors)) == expected
    graph = tf.function(lambda *ts: gradients_lib.all_finite([None, *ts]))
    assert bool(graph(*tensors)) == expected  # grappler must not fold `g * 0` away
    assert bool(gradients_lib.all_finite([])) is True


class NaNGradientAt(Trainer):
    """A finite loss whose gradient is NaN once the kernel's first entry is exactly zero:
    `sqrt(w0^2)` is 0 there and its derivative w0 / |w0| is 0 / 0."""

    def compute_terms(self, batch, training):
        x, y = batch
        mse = losses.mean_squared_error(y, self.model(x, training=training))
        kernel = self.model.trainable_variables[0]
        step = tf.cast(self._step, tf.float32)
        at = tf.where(step >= 3.0, 0.0, 1.0)  # zero from the fourth step on
        return {"mse": mse, "size": tf.sqrt(tf.square(kernel[0, 0] * at))}


def test_nonfinite_gradient_of_finite_terms_raises_naming_the_gradient():
    x, y = regression_data(64, features=2)
    model = linear_model()
    t = NaNGradientAt(model, sgd(), progress=False, steps_per_execution=2)
    t.fit((x, y), steps=3, batch_size=16)
    good = weights_of(model)
    with pytest.raises(
        NonFiniteLossError, match=r"The gradient of phase 'train' became NaN or Inf at step 4"
    ):
        t.fit((x, y), steps=3, batch_size=16)
    assert t.step == 3
    for a, b in zip(good, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_gradient_skipped_and_counted():
    x, y = regression_data(64, features=2)
    model = linear_model()
    t = NaNGradientAt(model, sgd(), progress=False, on_nonfinite="skip")
    t.fit((x, y), steps=3, batch_size=16)
    good = weights_of(model)
    t.fit((x, y), steps=4, batch_size=16)
    assert t.step == 7 and t.skipped_steps == 4
    for a, b in zip(good, weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)


class HugeGradient(Trainer):
    """A finite loss with finite gradients whose elements sum past float32's largest value."""

    def compute_terms(self, batch, training):
        del batch, training
        kernel = self.model.trainable_variables[0]
        return {"huge": 1e37 * tf.reduce_sum(kernel)}


def test_large_finite_gradients_are_applied():
    inputs = keras.Input((1000,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="zeros")(inputs))
    x = np.zeros((8, 1000), "float32")
    t = HugeGradient(model, sgd(1e-37), progress=False)
    t.fit(tf.data.Dataset.from_tensors(x).repeat(), steps=1)
    np.testing.assert_allclose(np.array(model.trainable_variables[0]), -1.0, rtol=1e-5)
    assert t.step == 1


def _halve_or_triple(values):
    if tf.reduce_mean(values) > 1.0:  # autograph: a Python `if` on a tensor
        return values * 0.5
    return values * 3.0


def _warm_up(step):
    if step < 3:  # a tensor too
        return 0.0
    return 1.0


class BranchingTrainer(Trainer):
    def compute_terms(self, batch, training):
        x, y = batch
        pred = self.model(x, training=training)
        offset = tf.zeros_like(pred[:, 0])
        for i in tf.range(3):  # and a `for` over a tensor: 0 + 1 + 2
            offset += tf.cast(i, tf.float32)
        branch = _halve_or_triple(x)[:, 0] + offset
        return {"mse": losses.mean_squared_error(y, pred), "branch": branch}


def test_python_control_flow_on_tensors_in_user_code_works_as_under_tf_function():
    x = np.array([[4.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.1, 0.0]], "float32")
    y = np.zeros((4, 1), "float32")
    t = BranchingTrainer(
        linear_model(), sgd(0.0), progress=False, log_every=1, weights={"branch": _warm_up}
    )
    history = t.fit(tf.data.Dataset.from_tensors((x, y)).repeat(), steps=5)
    branch = x[:, 0] * (0.5 if x.mean() > 1.0 else 3.0) + 3.0  # the same rules, by hand
    np.testing.assert_allclose(history.history["loss/branch"], [branch.mean()] * 5, rtol=1e-6)
    assert history.history["weight/branch"] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_the_plain_step_checks_finiteness_in_a_few_ops():
    # Was one IsFinite (and one All) per term, weight and gradient: 2 x 2 + 4 variables here.
    inputs = keras.Input((2,))
    h = keras.layers.Dense(4)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))
    x, y = regression_data(32, features=2)
    t = Trainer(model, sgd(), loss={"a": losses.mean_squared_error}, progress=False)
    t.fit((x, y), steps=1, batch_size=16)
    graph = t._calls[False][1].graph.as_graph_def()
    ops = collections.Counter(n.op for n in graph.node)
    for function in graph.library.function:
        ops.update(n.op for n in function.node_def)
    assert ops["IsFinite"] <= 2, ops["IsFinite"]


def _unconditional_ops(graph_def) -> collections.Counter:
    """The ops of a function's graph and its library outside any `If` branch (and the functions
    those branches call), by type: what every step runs, whatever its checks found."""
    functions = {f.signature.name: f for f in graph_def.library.function}

    def called(nodes):
        for node in nodes:
            for key, value in node.attr.items():
                names = [value.func.name] + [f.name for f in value.list.func]
                yield from ((key, n) for n in names if n)

    conditional, todo = set(), []
    for nodes in [graph_def.node] + [f.node_def for f in functions.values()]:
        for node in nodes:
            if node.op in ("If", "StatelessIf"):
                todo += [node.attr[b].func.name for b in ("then_branch", "else_branch")]
    while todo:
        name = todo.pop()
        if name not in conditional and name in functions:
            conditional.add(name)
            todo += [n for _, n in called(functions[name].node_def)]
    ops = collections.Counter(n.op for n in graph_def.node)
    for name, function in functions.items():
        if name not in conditional:
            ops.update(n.op for n in function.node_def)
    return ops


def test_a_finite_step_writes_no_nonfinite_record():
    # The record of the first failure (which check, at which step) and the halt were three
    # `tf.where` assignments at every step; they are written in a `tf.cond` on the failure.
    # Unconditional: the window's last values only (its sums are AssignAdd, as the step's).
    x, y = regression_data(32, features=2)
    t = NaNGradientAt(linear_model(), sgd(), progress=False)
    t.fit((x, y), steps=1, batch_size=16)
    ops = _unconditional_ops(t._calls[False][1].graph.as_graph_def())
    assert ops["AssignVariableOp"] == 1, ops["AssignVariableOp"]
    with pytest.raises(NonFiniteLossError, match=r"gradient of phase 'train'.* at step 4"):
        t.fit((x, y), steps=5, batch_size=16)
    assert (t.step, int(t._nonfinite_step.numpy()), bool(t._halted.numpy())) == (3, 4, True)


def _penalised_trainer(**options):
    """A penalised model (seed 3) under Adam, logging every 5 steps, diagnosing every 4."""
    from helpers import penalised_model

    keras.utils.set_random_seed(3)
    model = penalised_model()
    options = {"log_every": 5, "grad_log_every": 4, "progress": False, **options}
    return model, Trainer(
        model, keras.optimizers.Adam(0.01), loss=losses.mean_squared_error, **options
    )


def test_the_default_calls_give_what_one_step_per_call_gives_bit_for_bit():
    x, y = regression_data(96)

    def train(**options):
        model, t = _penalised_trainer(**options)
        history = t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(), steps=23)
        return weights_of(model), history.history

    default_weights, default_logs = train()  # "auto": calls of 1, 2, 4 ... steps to boundaries
    weights, logs = train(steps_per_execution=1)
    for a, b in zip(default_weights, weights, strict=True):
        assert np.array_equal(a, b)
    assert default_logs.keys() == logs.keys()
    for key in logs:
        if not key.startswith("perf/"):
            assert default_logs[key] == logs[key], key


class CountingTrainer(Trainer):
    """Counts the traces of its training step."""

    traces = 0

    def _replica_train_step(self, batches, diagnostic=False):
        type(self).traces += 1
        return super()._replica_train_step(batches, diagnostic)


def test_the_first_fit_traces_the_plain_step_once():
    # The logging window created its variables inside the first trace, which made tf.function
    # trace the whole step a second time (about half of the time to the first step).
    x, y = regression_data(32, features=2)
    t = CountingTrainer(
        linear_model(),
        sgd(),
        loss=losses.mean_squared_error,
        progress=False,
        log_every=2,
        grad_log_every=0,
    )
    history = t.fit((x, y), steps=4, batch_size=16)
    assert CountingTrainer.traces == 1
    assert history.steps["loss/loss"] == [2, 4]  # the window, sized after the trace, logs its means
    assert t._window.sums.numpy().shape == (len(t._window.keys),)


def test_a_restored_window_of_other_keys_is_refused():
    from termwise.trainer import step as step_lib

    window = step_lib.Window()
    window.sums.assign(tf.zeros([3], tf.float64))  # as a checkpoint of three values restores
    window.keys = ("loss/a", "examples")
    with pytest.raises(ValueError, match="holds 3 values per step, but this run logs 2"):
        window.allocate()
    fresh = step_lib.Window()
    fresh.keys = ("loss/a", "examples")
    fresh.allocate()
    assert fresh.sums.numpy().tolist() == [0.0, 0.0] and fresh.last.numpy().shape == (2,)


class MetricTrainer(Trainer):
    def compute_terms(self, batch, training):
        x, y = batch
        pred = self.model(x, training=training)
        self.add_metric("below", losses.fraction_below(pred, 0.5))
        return {"mse": losses.mean_squared_error(y, pred)}


def test_autograph_converts_the_users_code_and_not_termwises(monkeypatch):
    # Termwise's own functions (sample_weight, the regularization sum, add_metric, the losses)
    # were converted beside the user's compute_terms: 0.1 to 0.4 s of the first step.
    from tensorflow.python.autograph.pyct import transpiler

    converted = []
    transform = transpiler.PyToPy.transform_function

    def recording(self, fn, user_context):
        converted.append(f"{fn.__module__}.{fn.__qualname__}")
        return transform(self, fn, user_context)

    monkeypatch.setattr(transpiler.PyToPy, "transform_function", recording)
    x, y = regression_data(32, features=2)
    t = MetricTrainer(linear_model(), sgd(), progress=False, grad_log_every=2)
    history = t.fit((x, y), steps=2, batch_size=16)
    assert converted and all(c == f"{__name__}.MetricTrainer.compute_terms" for c in converted), (
        converted
    )
    assert history.history["below"] and history.history["grad_norm/mse"]


class CountingSGD(keras.optimizers.SGD):
    """Counts the calls of `apply`: in a graph, one per trace that holds the update."""

    applies = 0

    def apply(self, grads, trainable_variables=None):
        type(self).applies += 1
        return super().apply(grads, trainable_variables)


def test_the_plain_and_diagnostic_functions_trace_the_update_once():
    # The optimizer's update is most of a small model's trace; the diagnostic function, traced
    # within the run's first grad_log_every steps, traced it a second time (VAE: 0.45 s).
    x, y = regression_data(32, features=2)
    runs = {}
    for every in (2, 0):
        CountingSGD.applies = 0
        keras.utils.set_random_seed(0)  # the same shuffled batches in both runs
        model = linear_model()
        t = Trainer(
            model,
            CountingSGD(0.01),
            loss=losses.mean_squared_error,
            progress=False,
            log_every=0,
            grad_log_every=every,
        )
        t.fit((x, y), steps=6, batch_size=16)
        assert CountingSGD.applies == 1, every
        assert set(t._train_functions) == ({False, True} if every else {False})
        runs[every] = weights_of(model)
    for with_diagnostics, without in zip(runs[2], runs[0], strict=True):
        assert np.array_equal(with_diagnostics, without)


def test_the_diagnostic_function_is_compiled_with_the_first_call_and_changes_nothing():
    # Traced at the run's first diagnostic step, where its first call also paid for the graph's
    # optimisation, it took about 0.5 s of a VAE's first 1,000 steps (0.9 s at the steady
    # state). It is now traced beside the fit's first call and instantiated by a call of zero
    # steps on a second thread: that call must take no batch, draw no random number, change no
    # state.
    x, y = regression_data(96)
    runs = {}
    for ahead in (True, False):
        model, t = _penalised_trainer()
        if not ahead:
            t._compile_diagnostic_ahead = lambda iterator: None
        data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(96, seed=1).batch(16).repeat()
        t.fit(data, steps=1)
        assert (True in t._calls) == ahead  # traced before any diagnostic step
        history = t.fit(data, steps=22)
        assert t._compiling is None  # the thread joined at the first diagnostic step
        runs[ahead] = weights_of(model), history.history, t.seed_generator.state.numpy()
    (weights, logs, seed), (other_weights, other_logs, other_seed) = runs[True], runs[False]
    for a, b in zip(weights, other_weights, strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(seed, other_seed)
    assert logs.keys() == other_logs.keys() and logs["grad_norm/loss"]
    for key in logs:
        if not key.startswith("perf/"):
            assert logs[key] == other_logs[key], key


def test_every_call_of_the_diagnostic_function_skips_grappler_on_every_thread(monkeypatch):
    # Grappler was half of the diagnostic function's instantiation, in the run's first steps.
    # TensorFlow instantiates a function once per call options, so the zero-step call on the
    # compile thread and the diagnostic calls on the call thread must all use the same.
    seen = []
    original = Trainer._traced

    def traced(self, iterator, diagnostic):
        function = original(self, iterator, diagnostic)
        if not diagnostic:
            return function

        def spy(*args):
            options = context.context().function_call_options
            config = config_pb2.ConfigProto.FromString(options.config_proto_serialized)
            off = config.graph_options.rewrite_options.disable_meta_optimizer
            seen.append((threading.current_thread().name.split("_")[0], off))
            return function(*args)

        return spy

    monkeypatch.setattr(Trainer, "_traced", traced)
    x, y = regression_data(96)
    _, t = _penalised_trainer()
    t.fit((x, y), steps=9, batch_size=16)
    assert sorted(set(seen)) == [("termwise-call", True), ("termwise-compile", True)], seen
    assert len(seen) == 3  # the zero-step call, and steps 4 and 8
    options = context.context().function_call_options  # the thread's own are left as they were
    config = config_pb2.ConfigProto.FromString(options.config_proto_serialized)
    assert not config.graph_options.rewrite_options.disable_meta_optimizer
