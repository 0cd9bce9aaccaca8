"""Schedules at known steps, against values computed by hand, and their parse errors."""

import math

import numpy as np
import pytest
import tensorflow as tf

from termwise.trainer import schedules


def values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_constant_and_bare_number():
    assert values(schedules.constant(0.3), [0, 10**6]) == pytest.approx([0.3, 0.3])
    assert float(schedules.parse("0.25")(7)) == pytest.approx(0.25)
    assert schedules.parse("constant:2").spec == "constant:2"


def test_linear_with_and_without_delay():
    ramp = schedules.parse("linear:0:1:10")
    assert values(ramp, [0, 1, 5, 10, 11, 1000]) == pytest.approx([0, 0.1, 0.5, 1, 1, 1])
    delayed = schedules.linear(1.0, 0.0, 4, begin=2)
    assert values(delayed, [0, 2, 3, 6, 9]) == pytest.approx([1, 1, 0.75, 0, 0])
    assert delayed.spec == "linear:1:0:4:2"


def test_cosine():
    sched = schedules.parse("cosine:1:0:100")
    expected = [0.5 * (1 + math.cos(math.pi * s / 100)) for s in (0, 25, 50, 100)]
    assert values(sched, [0, 25, 50, 100, 150]) == pytest.approx(expected + [0.0], abs=1e-6)


def test_exponential():
    sched = schedules.parse("exponential:2:0.5:10")
    assert values(sched, [0, 10, 20, 5]) == pytest.approx([2, 1, 0.5, 2 * 0.5**0.5], rel=1e-6)


def test_piecewise_boundaries_take_the_new_value():
    sched = schedules.parse("piecewise:0.1:100:0.5:200:1")
    assert values(sched, [0, 99, 100, 199, 200, 10**5]) == pytest.approx(
        [0.1, 0.1, 0.5, 0.5, 1.0, 1.0]
    )
    assert sched.spec == "piecewise:0.1:100:0.5:200:1"


def test_logistic_bowman():
    sched = schedules.parse("logistic:1:2500:0.0025")
    for step in (0, 2500, 4000):
        assert float(sched(step)) == pytest.approx(1 / (1 + math.exp(-0.0025 * (step - 2500))))
    assert float(sched(2500)) == pytest.approx(0.5)


def test_cyclical_fu_et_al_at_cycle_boundaries():
    # period 10, rising over the first half: 0, .2, .4, .6, .8, 1, 1, 1, 1, 1, then again.
    sched = schedules.parse("cyclical:0:1:10:0.5")
    got = values(sched, range(21))
    expected = [min(1.0, (s % 10) / 10 / 0.5) for s in range(21)]
    assert got == pytest.approx(expected)
    assert got[9] == 1.0 and got[10] == 0.0 and got[20] == 0.0  # each cycle restarts at low
    # M = 2 cycles of 10 steps: after step 20 it stays at the plateau.
    capped = schedules.cyclical(0.1, 0.9, 10, ratio=0.25, cycles=2)
    assert values(capped, [0, 1, 3, 10, 19, 20, 25]) == pytest.approx(
        [0.1, 0.1 + 0.8 * 0.4, 0.9, 0.1, 0.9, 0.9, 0.9]
    )
    assert capped.spec == "cyclical:0.1:0.9:10:0.25:2"


def test_specs_round_trip():
    for spec in [
        "linear:0:1:5000",
        "cosine:1:0.1:300:10",
        "cyclical:0:1:2000:0.5",
        "logistic:1:100:0.1",
        "exponential:1:0.9:100",
        "piecewise:1:5:2",
    ]:
        again = schedules.parse(schedules.parse(spec).spec)
        assert values(again, [0, 7, 3000]) == pytest.approx(
            values(schedules.parse(spec), [0, 7, 3000])
        )


def test_in_graph_without_retracing():
    sched = schedules.parse("linear:0:1:100")
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def weight():
        return sched(step)

    seen = []
    for s in (0, 50, 100):
        step.assign(s)
        seen.append(float(weight()))
    assert seen == pytest.approx([0, 0.5, 1])
    assert weight.experimental_get_tracing_count() == 1
    jitted = tf.function(lambda s: sched(s), jit_compile=True)
    assert float(jitted(tf.constant(25, tf.int64))) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("linear:0:1", "linear takes 3 to 4 numbers, got 2"),
        ("linear:0:one:10", "not a number"),
        ("ramp:0:1:10", "unknown schedule 'ramp'"),
        ("linear:0:1:0", r"`steps` \(0.0\) must be a positive"),
        ("cyclical:0:1:100:1.5", r"`ratio` \(1.5\) must be in \(0, 1\]"),
        ("cyclical:0:1:100:0.5:2.5", r"`cycles` \(2.5\)"),
        ("piecewise:0:10", "piecewise needs"),
        ("piecewise:0:10:1:5:2", "strictly increasing"),
        ("exponential:1:0:10", r"`rate` \(0.0\) must be positive"),
        ("", "unknown schedule"),
    ],
)
def test_parse_errors_show_the_string_and_the_forms(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        schedules.parse(spec)
    assert repr(spec) in str(info.value)
    assert "accepted forms: constant:V, linear:START:END:STEPS[:BEGIN]" in str(info.value)


def test_schedule_as_trainer_weight_matches_numpy():
    sched = schedules.parse("cyclical:0:2:8:0.25")
    steps = np.arange(17)
    expected = 2 * np.minimum(1.0, (steps % 8) / 8 / 0.25)
    np.testing.assert_allclose(values(sched, steps), expected, rtol=1e-6)
